"""Biased expert MLPs and the clamped SwiGLU unit against a NumPy per-row loop, for every
grouped-matmul implementation (Pallas interpreted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import kernels

IMPLS = ["xla", "ragged_dot", "pallas"]


def _clamped_swiglu_np(gate, up, alpha, limit):
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))


def _act_np(activation, pre, alpha, limit):
    if activation == "swiglu":
        return pre[0] / (1.0 + np.exp(-pre[0])) * pre[1]
    if activation == "clamped_swiglu":
        return _clamped_swiglu_np(*pre, alpha, limit)
    return np.maximum(pre[0], 0.0)  # relu


def _loop_reference(x, w_in, w_down, b_in, b_down, sizes, activation, alpha, limit):
    """One row at a time: its expert from the group sizes, the biased MLP; rows past the groups
    are zeros."""
    x, w_down, b_down = (np.asarray(a, np.float64) for a in (x, w_down, b_down))
    ends = np.cumsum(sizes)
    out = np.zeros((x.shape[0], w_down.shape[-1]))
    for r in range(int(ends[-1])):
        g = int(np.searchsorted(ends, r, side="right"))
        pre = [x[r] @ np.asarray(w[g], np.float64) + np.asarray(b[g]) for w, b in zip(w_in, b_in)]
        out[r] = _act_np(activation, pre, alpha, limit) @ w_down[g] + b_down[g]
    return out


def _inputs(activation, seed=0, g=3, m=13, d=8, f=16):
    rng = np.random.default_rng(seed)
    num_in = 2 if activation in kernels.GATED else 1
    x = rng.normal(size=(m, d)).astype(np.float32)
    w_in = tuple(rng.normal(size=(g, d, f)).astype(np.float32) * 0.5 for _ in range(num_in))
    w_down = rng.normal(size=(g, f, d)).astype(np.float32) * 0.3
    b_in = tuple(rng.normal(size=(g, f)).astype(np.float32) for _ in range(num_in))
    b_down = rng.normal(size=(g, d)).astype(np.float32)
    sizes = np.array([4, 0, 6], np.int32)  # an empty group, and 3 rows past the groups
    return x, w_in, w_down, b_in, b_down, sizes


def test_clamped_swiglu_matches_formula_and_clamps():
    gate = np.array([-9.0, -1.0, 0.0, 0.5, 3.0, 20.0], np.float32)
    up = np.array([-20.0, -0.5, 2.0, 7.5, 1.0, -3.0], np.float32)
    got = kernels.ClampedSwiGLU(alpha=1.702, limit=7.0)(gate, up)
    np.testing.assert_allclose(got, _clamped_swiglu_np(gate, up, 1.702, 7.0), rtol=1e-6)
    # past the limit the unit is flat in the gate (clamped) and in the up projection
    assert got[-1] == kernels.ClampedSwiGLU()(jnp.float32(7.0), jnp.float32(-3.0))
    assert kernels.ACTIVATIONS["clamped_swiglu"] == kernels.ClampedSwiGLU(1.702, 7.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["clamped_swiglu", "swiglu", "relu"])
def test_biased_expert_mlp_matches_loop(impl, activation):
    x, w_in, w_down, b_in, b_down, sizes = _inputs(activation)
    alpha, limit = 1.3, 1.5
    got = kernels.expert_mlp(
        x, w_in, w_down, sizes, activation=activation, b_in=b_in, b_down_GxD=b_down,
        swiglu_alpha=alpha, swiglu_limit=limit, implementation=impl,
    )  # fmt: skip
    want = _loop_reference(x, w_in, w_down, b_in, b_down, sizes, activation, alpha, limit)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(got)[sizes.sum() :]), "bias leaked into rows past the groups"


def test_bias_gradients_agree_across_implementations():
    """`xla`'s hand-written backward (bias grads summed tile by tile) against autodiff of the
    "ragged_dot" path."""
    x, w_in, w_down, b_in, b_down, sizes = _inputs("clamped_swiglu", seed=1)
    ct = np.random.default_rng(2).normal(size=(x.shape[0], x.shape[1])).astype(np.float32)

    def loss(impl):
        def fn(x, w_in, w_down, b_in, b_down):
            y = kernels.expert_mlp(
                x, w_in, w_down, sizes, activation="clamped_swiglu", b_in=b_in,
                b_down_GxD=b_down, swiglu_limit=1.5, implementation=impl,
            )  # fmt: skip
            return jnp.sum(y * ct)

        return jax.grad(fn, argnums=(0, 1, 2, 3, 4))(x, w_in, w_down, b_in, b_down)

    got, want = loss("xla"), loss("ragged_dot")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    # the bias of the empty expert 1 gets no gradient
    assert not np.any(np.asarray(got[3][0])[1]) and not np.any(np.asarray(got[4])[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_matmul_bias(impl):
    x, (w,), _, (b,), _, sizes = _inputs("relu", seed=3)
    got = kernels.grouped_matmul(x, w, sizes, bias_GxN=b, implementation=impl)
    ends = np.cumsum(sizes)
    want = np.zeros(got.shape)
    for r in range(int(ends[-1])):
        g = int(np.searchsorted(ends, r, side="right"))
        want[r] = x[r] @ w[g] + b[g]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_bias_count_is_refused():
    x, w_in, w_down, b_in, b_down, sizes = _inputs("swiglu")
    with pytest.raises(ValueError, match="b_in has 1 biases"):
        kernels.expert_mlp(x, w_in, w_down, sizes, b_in=b_in[:1])
