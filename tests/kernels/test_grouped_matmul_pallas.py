"""`jmoe.kernels` with implementation="pallas" (the kernels interpreted on CPU) against the same
NumPy per-group references as `test_grouped_matmul.py`, the fused gating against `routing.top_k`,
and the MoE layer's "pallas" option against its "xla" twin."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases
from test_grouped_matmul import (
    ACTIVATIONS,
    GS_CASES,
    TOL,
    G,
    K,
    M,
    N,
    _check_gmm,
    _check_mlp,
    _inputs,
    ref_gmm,
)

import jmoe
from jmoe import kernels
from jmoe.moe import gating, routing


@functools.cache
def _gmm_run():
    @jax.jit
    def run(x, w, gs, ct):
        f = lambda x, w: kernels.grouped_matmul(x, w, gs, implementation="pallas")  # noqa: E731
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct))

    return run


@functools.cache
def _mlp_run(activation):
    def f(x, w_in, w_down, gs):
        kw = dict(activation=activation, implementation="pallas")
        return kernels.expert_mlp(x, w_in, w_down, gs, **kw)

    @jax.jit
    def run(x, w_in, w_down, gs, ct):
        y, vjp = jax.vjp(lambda *a: f(*a, gs), x, w_in, w_down)
        return (y, *vjp(ct))

    return run


def test_grouped_matmul_over_catalogue():
    for gs in GS_CASES.values():
        _check_gmm(_gmm_run(), gs, seed=1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_over_catalogue(activation):
    cases = GS_CASES if activation == "swiglu" else {"ragged_tail": GS_CASES["ragged_tail"]}
    for gs in cases.values():
        _check_mlp(_mlp_run(activation), activation, gs, seed=5)


def test_grouped_matmul_bfloat16():
    x, w = _inputs(4, (M, K), (G, K, N))
    gs = GS_CASES["ragged_tail"]
    # float32 weights with bfloat16 rows: the weights are cast to the rows' dtype
    y = kernels.grouped_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), gs,
                           implementation="pallas")  # fmt: skip
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref_gmm(x, w, gs, np.zeros((M, N)))[0],
                               **TOL[jnp.bfloat16])  # fmt: skip


@pytest.mark.parametrize("case", [shape_cases.ROUTING_CASES[1], shape_cases.ROUTING_CASES[-1]],
                         ids=lambda c: c.name)  # fmt: skip
def test_top_k_gating_matches_routing_top_k(case):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(case.num_tokens, 8)).astype(np.float32)
    w = rng.normal(size=(8, case.num_experts)).astype(np.float32)
    if case.name == "ties":
        w[:] = 0.0
    bias = np.linspace(0.0, 0.2, case.num_experts, dtype=np.float32)
    for kw in (dict(), dict(score="sigmoid", bias=bias, normalize=True, scale=2.0)):
        r, counts = gating.top_k_gating(x, w, case.k, implementation="pallas", **kw)
        expected = routing.top_k(r.logits, case.k, **kw)
        np.testing.assert_array_equal(r.expert_ids, expected.expert_ids)
        np.testing.assert_allclose(r.weights, expected.weights, rtol=1e-6)
        np.testing.assert_allclose(r.probs, expected.probs, rtol=1e-6, atol=1e-7)
        assert r.valid.all()
        np.testing.assert_array_equal(counts, np.bincount(np.ravel(r.expert_ids),
                                                          minlength=case.num_experts))  # fmt: skip
        xla, xla_counts = gating.top_k_gating(x, w, case.k, implementation="xla", **kw)
        np.testing.assert_allclose(r.logits, xla.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(counts, xla_counts)


def test_top_k_gating_groups_and_k1_renorm_match_routing_top_k():
    """DeepSeek-V3 group-limited selection and the k = 1 renormalisation run in the kernel too."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32)
    bias = np.linspace(0.0, 0.2, 32, dtype=np.float32)
    for k, kw in (
        (8, dict(score="sigmoid", bias=bias, normalize=True, scale=2.5, n_groups=8, top_groups=4)),
        (1, dict(normalize=True, renorm_when_k1=True)),
    ):
        r, counts = gating.top_k_gating(x, w, k, implementation="pallas", **kw)
        expected = routing.top_k(r.logits, k, **kw)
        np.testing.assert_array_equal(r.expert_ids, expected.expert_ids)
        np.testing.assert_allclose(r.weights, expected.weights, rtol=1e-6)
        np.testing.assert_array_equal(counts, np.bincount(np.ravel(r.expert_ids), minlength=32))


DEEPSEEK_V3_ROUTING = dict(
    router=jmoe.TopK(k=2, score="sigmoid", normalize=True, scale=2.5, n_groups=4, top_groups=2)
)


@pytest.mark.parametrize("routing_kw", [{}, DEEPSEEK_V3_ROUTING], ids=["top2", "deepseek_v3"])
def test_moe_layer_pallas_matches_xla(routing_kw):
    """The layer option reaches the kernels: same outputs and statistics as the XLA path
    (gradients are checked at the ops level above)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 16)), jnp.float32)
    cfgs = {
        impl: jmoe.MoEConfig(d_model=16, d_ff=32, num_experts=8, implementation=impl, **routing_kw)
        for impl in ("pallas", "xla")
    }
    variables = jax.jit(jmoe.MoE(cfgs["xla"]).init)(jax.random.key(0), x)  # same tree for both
    outs = {impl: jax.jit(jmoe.MoE(cfg).apply)(variables, x) for impl, cfg in cfgs.items()}
    (y_p, stats_p), (y_x, stats_x) = outs["pallas"], outs["xla"]
    assert np.abs(np.asarray(y_x)).max() > 0.1
    np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5)
    for key in stats_x:
        np.testing.assert_allclose(stats_p[key], stats_x[key], rtol=1e-5, atol=1e-6, err_msg=key)
