"""Group-limited selection (`TopK.group_score`) against the NumPy loop of tests/moe_reference.py,
and the learned router logit bias on the XLA and fused Pallas gating paths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
import moe_reference as ref
from jmoe.moe import routing

# (E, k, n_groups, top_groups): k below, equal to and above 2 * top_groups, one kept group
CASES = [(16, 3, 4, 2), (16, 4, 4, 2), (16, 7, 4, 2), (12, 3, 3, 1), (8, 1, 4, 3)]


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("e,k,n_groups,top_groups", CASES)
def test_group_limited_top_k_matches_loop(e, k, n_groups, top_groups, group_score):
    rng = np.random.default_rng(e * 10 + k)
    logits = rng.normal(size=(40, e)).astype(np.float32)
    logits[:8] = np.round(logits[:8])  # ties inside and between groups
    logits[8:12] = 0.0  # all equal: the first groups, the lowest experts
    bias = (0.2 * rng.normal(size=e)).astype(np.float32)
    opts = dict(score="sigmoid", normalize=True, bias=bias, n_groups=n_groups)
    got = routing.top_k(logits, k, top_groups=top_groups, group_score=group_score, **opts)
    want_ids, want_w, _ = ref.ref_top_k(
        logits, k, top_groups=top_groups, group_score=group_score, **opts
    )
    np.testing.assert_array_equal(got.expert_ids, want_ids)
    np.testing.assert_allclose(got.weights, want_w, rtol=1e-5)


def test_top2_sum_and_max_pick_different_groups():
    """Group 0 holds 0.5, 0.5; group 1 holds 0.9, 0.05: the sum of the two best prefers group 0
    (1.0 > 0.95), the best one group 1 (0.9 > 0.5). k = 1 < 2 * top_groups: the earlier rule
    (sum of the best max(1, k // top_groups) = 1) would have scored like "max"."""
    probs = np.array([[0.5, 0.5, 0.0, 0.0, 0.9, 0.05, 0.0, 0.0]], np.float32)
    logits = np.log(probs + 1e-3)  # sigmoid keeps the order; the bias makes the scores exact
    bias = probs[0] - jax.nn.sigmoid(logits[0])
    opts = dict(score="sigmoid", bias=bias, n_groups=2, top_groups=1)
    assert routing.top_k(logits, 1, group_score="top2_sum", **opts).expert_ids.tolist() == [[0]]
    assert routing.top_k(logits, 1, group_score="max", **opts).expert_ids.tolist() == [[4]]


def test_group_score_is_checked():
    with pytest.raises(ValueError, match="group_score"):
        jmoe.TopK(group_score="sum")
    with pytest.raises(ValueError, match="group_score='top2_sum'.*1 expert"):
        jmoe.MoEConfig(num_experts=4, router=jmoe.TopK(k=1, n_groups=4, top_groups=2))
    jmoe.MoEConfig(
        num_experts=4, router=jmoe.TopK(k=1, n_groups=4, top_groups=2, group_score="max")
    )


@pytest.mark.parametrize("chain_steps", [1, 2])
def test_router_bias_on_xla_and_fused_gating(chain_steps):
    """`router/bias` `[E]` (`[C, E]` for a chain) shifts the logits before scoring, on the plain
    path and inside the fused Pallas gating kernel alike, with the same gradients."""
    cfg = jmoe.MoEConfig(
        d_model=8, d_ff=16, num_experts=4, router_bias=True, chain_steps=chain_steps,
        router=jmoe.TopK(k=2, score="sigmoid", n_groups=2, top_groups=1, group_score="max"),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    variables = jmoe.MoE(cfg).init(jax.random.key(1), x)
    bias = variables["params"]["router"]["bias"]
    assert bias.shape == ((4,) if chain_steps == 1 else (chain_steps, 4)) and not bias.any()
    bias = jnp.array([3.0, -2.0, 0.5, 1.0]) * jnp.ones_like(bias)
    params = {**variables["params"], "router": {**variables["params"]["router"], "bias": bias}}
    variables = {**variables, "params": params}
    x_TxD = x.reshape(-1, 8)
    kernel = params["router"]["kernel"] if chain_steps == 1 else params["router"]["kernel"][0]
    logits = np.asarray(x_TxD @ kernel + (bias if chain_steps == 1 else bias[0]))

    def run(impl):
        model = jmoe.MoE(dataclasses.replace(cfg, implementation=impl))
        (y, _), inter = model.apply(variables, x, mutable=["intermediates"])
        grads = jax.grad(lambda p: model.apply({**variables, "params": p}, x)[0].sum())(params)
        return y, inter["intermediates"]["routing"][0], grads

    y_xla, r_xla, g_xla = run("xla")
    y_pallas, r_pallas, g_pallas = run("pallas")
    want_ids, _, _ = ref.ref_top_k(
        logits, 2, score="sigmoid", normalize=True, n_groups=2, top_groups=1, group_score="max"
    )
    np.testing.assert_array_equal(r_xla.expert_ids, want_ids)
    np.testing.assert_array_equal(r_pallas.expert_ids, want_ids)
    np.testing.assert_allclose(r_xla.logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_pallas, y_xla, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(g_pallas), jax.tree.leaves(g_xla), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert np.abs(g_xla["router"]["bias"]).sum() > 0
