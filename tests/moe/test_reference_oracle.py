"""Sanity checks of the test oracle `tests/moe_reference.py` against hand values and dense math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref

# ---------------------------------------------------------------------------------- ref_top_k


def test_ref_top_k_known_answers():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    ids, w, p = ref.ref_top_k(logits, 2)
    e = np.exp(logits[0])
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_allclose(w, [[e[0] / e.sum(), e[1] / e.sum()]])
    _, w, _ = ref.ref_top_k(logits, 2, normalize=True, scale=2.0)
    np.testing.assert_allclose(w, [[2 * e[0] / (e[0] + e[1]), 2 * e[1] / (e[0] + e[1])]])
    # Bias moves expert 3 to the front; weights stay unbiased.
    ids, w, _ = ref.ref_top_k(logits, 2, bias=[0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(ids, [[3, 0]])
    np.testing.assert_allclose(w, [[e[3] / e.sum(), e[0] / e.sum()]])
    # Ties: lower index first.
    ids, _, _ = ref.ref_top_k(np.zeros((1, 5)), 3, score="sigmoid")
    np.testing.assert_array_equal(ids, [[0, 1, 2]])


def test_ref_top_k_groups_known_answer():
    # 3 groups of 2; sigmoid scores ~ s.
    s = np.array([[0.9, 0.1, 0.5, 0.45, 0.8, 0.0]])
    logits = np.log(s / (1 - s + 1e-300) + 1e-300)
    ids, _, _ = ref.ref_top_k(logits, 2, score="sigmoid", n_groups=3, top_groups=1)
    # "top2_sum": group scores [1.0, 0.95, 0.8] -> group 0 only.
    np.testing.assert_array_equal(ids, [[0, 1]])
    ids, _, _ = ref.ref_top_k(logits, 2, score="sigmoid", n_groups=3, top_groups=2)
    # "top2_sum" (whatever k): [1.0, 0.95, 0.8] -> groups 0, 1.
    np.testing.assert_array_equal(ids, [[0, 2]])
    ids, _, _ = ref.ref_top_k(
        logits, 2, score="sigmoid", n_groups=3, top_groups=2, group_score="max"
    )
    # "max": [0.9, 0.5, 0.8] -> groups 0, 2.
    np.testing.assert_array_equal(ids, [[0, 4]])


def test_ref_capacity_first_choices_queued_first():
    ids = np.array([[0, 1], [1, 0], [0, 1], [0, 2]])
    kept = ref.ref_capacity(ids, 3, capacity=2)
    # expert 0 queue: t0 s0, t2 s0, t3 s0 (drop), t1 s1 (drop)
    # expert 1 queue: t1 s0, t0 s1, t2 s1 (drop); expert 2: t3 s1.
    np.testing.assert_array_equal(kept, [[True, True], [True, False], [True, False], [False, True]])


def test_ref_losses_known_answers():
    ids = np.zeros((6, 1), int)
    probs = np.tile([1.0, 0.0, 0.0, 0.0], (6, 1))
    assert ref.ref_load_balance(ids, np.ones((6, 1), bool), probs, 4, "switch_top1") == 4.0
    assert ref.ref_z_loss(np.zeros((3, 8))) == pytest.approx(np.log(8) ** 2)
    assert ref.ref_entropy(np.full((2, 4), 0.25)) == pytest.approx(np.log(4))
    assert ref.ref_entropy(probs) == 0.0


# ---------------------------------------------------------------------------------- ref_moe


def _params(key, d, f, e, activation, fs=None, gate=False):
    ks = jax.random.split(key, 9)
    n = lambda k, s: 0.5 * jax.random.normal(k, s, jnp.float32)  # noqa: E731
    params = {
        "router": {"kernel": n(ks[0], (d, e))},
        "experts": {"w_up": n(ks[1], (e, d, f)), "w_down": n(ks[2], (e, f, d))},
    }
    if activation == "swiglu":
        params["experts"]["w_gate"] = n(ks[3], (e, d, f))
    if fs:
        params["shared"] = {"w_up": n(ks[4], (d, fs)), "w_down": n(ks[5], (fs, d))}
        if activation == "swiglu":
            params["shared"]["w_gate"] = n(ks[6], (d, fs))
    if gate:
        params["shared_gate"] = {"kernel": n(ks[7], (d, 1))}
    return params


def _dense_moe(params, x, weights_TxE, activation, shared):
    """Every expert on every token, vectorised, mixed by a dense `[T, E]` weight matrix."""
    ex = params["experts"]
    up = jnp.einsum("td,edf->tef", x, ex["w_up"])
    if activation == "swiglu":
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, ex["w_gate"])) * up
    elif activation == "gelu":
        h = jax.nn.gelu(up, approximate=False)
    else:
        h = jax.nn.relu(up)
    y = jnp.einsum("tef,efd,te->td", h, ex["w_down"], weights_TxE)
    if shared:
        sh = params["shared"]
        su = x @ sh["w_up"]
        if activation == "swiglu":
            hs = jax.nn.silu(x @ sh["w_gate"]) * su
        elif activation == "gelu":
            hs = jax.nn.gelu(su, approximate=False)
        else:
            hs = jax.nn.relu(su)
        s = hs @ sh["w_down"]
        if shared == "gated":
            s = s * jax.nn.sigmoid(x @ params["shared_gate"]["kernel"])
        y = y + s
    return y


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("shared", [None, "plain", "gated"])
def test_ref_moe_k_equals_e_matches_dense(activation, shared):
    t, d, f, e = 5, 6, 4, 3
    params = _params(
        jax.random.key(0), d, f, e, activation, fs=5 if shared else None, gate=shared == "gated"
    )
    x = jax.random.normal(jax.random.key(1), (t, d))
    cfg = {
        "score": "softmax",
        "normalize": True,
        "activation": activation,
        "shared_gate": shared == "gated",
    }
    logits = np.asarray(x @ params["router"]["kernel"])
    ids, _, _ = ref.ref_top_k(logits, e)

    def loss_ref(p):
        return jnp.sum(ref.ref_moe(p, x, cfg, ids) ** 2)

    def loss_dense(p):
        w = jax.nn.softmax(x @ p["router"]["kernel"], -1)  # k = E, renormalised = softmax
        return jnp.sum(_dense_moe(p, x, w, activation, shared) ** 2)

    y_ref = ref.ref_moe(params, x, cfg, ids)
    w = jax.nn.softmax(x @ params["router"]["kernel"], -1)
    np.testing.assert_allclose(
        y_ref, _dense_moe(params, x, w, activation, shared), rtol=1e-5, atol=1e-5
    )
    g_ref, g_dense = jax.grad(loss_ref)(params), jax.grad(loss_dense)(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g_ref["router"]["kernel"]).max()) > 0


def test_ref_moe_top_k_with_drops_matches_masked_dense():
    """k < E with capacity drops: dropped slots contribute 0 and the rest is not renormalised."""
    t, d, f, e, k = 8, 4, 3, 4, 2
    params = _params(jax.random.key(2), d, f, e, "swiglu")
    x = jax.random.normal(jax.random.key(3), (t, d))
    logits = np.asarray(x @ params["router"]["kernel"])
    ids, w, _ = ref.ref_top_k(logits, k, score="sigmoid", normalize=True, scale=2.5)
    kept = ref.ref_capacity(ids, e, capacity=3)
    assert not kept.all()
    cfg = {"score": "sigmoid", "normalize": True, "scale": 2.5, "activation": "swiglu"}
    y = ref.ref_moe(params, x, cfg, ids, kept)
    dense_w = np.zeros((t, e))
    for i in range(t):
        for j in range(k):
            if kept[i, j]:
                dense_w[i, ids[i, j]] += w[i, j]
    np.testing.assert_allclose(
        y,
        _dense_moe(params, x, jnp.asarray(dense_w, jnp.float32), "swiglu", None),
        rtol=1e-5,
        atol=1e-5,
    )
