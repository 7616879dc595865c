"""`jmoe.compress.merge`: MC-SMoE expert merging, each step against a plain NumPy reference, and
whole models whose experts are copies of each other merged without loss."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.compress import merge, surgery
from jmoe.compress.trace import layer_routings
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK
from jmoe.moe.routing import Routing

D, F = 16, 8


def _model(router=TopK(k=2), scan_layers=False, chain_steps=1, **moe_fields):
    moe = MoEConfig(
        d_model=D, d_ff=F, num_experts=4, router=router, chain_steps=chain_steps, **moe_fields
    )
    config = ModelConfig(
        vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=16, moe=moe, scan_layers=scan_layers
    )
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    return config, jax.jit(Transformer(config).init)(jax.random.key(0), tokens), tokens


def _random_expert(rng, names=("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")):
    shapes = {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D), "b_down": (D,)}
    return {n: rng.normal(size=shapes.get(n, (F,))) for n in names}


def _swiglu_mlp(expert, x_TxD):
    """One SwiGLU expert with biases, in NumPy."""
    gate = x_TxD @ expert["w_gate"] + expert["b_gate"]
    up = x_TxD @ expert["w_up"] + expert["b_up"]
    return (gate / (1 + np.exp(-gate)) * up) @ expert["w_down"] + expert["b_down"]


def _layer(experts_E, router_kernel, state=None):
    """A hand-made `MoELayerWeights` from a list of per-expert dicts."""
    params = {
        "router": {"kernel": jnp.asarray(router_kernel, jnp.float32)},
        "experts": {
            n: jnp.asarray(np.stack([e[n] for e in experts_E]), jnp.float32) for n in experts_E[0]
        },
    }
    return surgery.MoELayerWeights(0, params, state or {})


# --- the steps against NumPy references -------------------------------------------------------


def test_usage_counts_valid_unmasked_slots_of_every_chain_step():
    # E = 3, K = 2, T = 4; the slot id 3 is an unused bucket; token 2 is padding.
    ids = [np.array([[0, 1], [1, 3], [2, 0], [1, 1]]), np.array([[2, 3], [0, 2], [0, 0], [3, 3]])]
    valid = [i < 3 for i in ids]
    mask_T = np.array([True, True, False, True])
    routings = [
        Routing(jnp.asarray(i), jnp.where(v, 0.5, 0.0), jnp.asarray(v), None, None)
        for i, v in zip(ids, valid)
    ]
    counts = np.zeros(3)
    for i, v in zip(ids, valid):
        for t in range(4):
            for k in range(2):
                if v[t, k] and mask_T[t]:
                    counts[i[t, k]] += 1
    assert counts.tolist() == [2, 4, 2]  # the hand count
    np.testing.assert_allclose(merge.expert_usage(routings, mask_T, 3), counts / counts.sum())
    nothing = merge.expert_usage(routings, np.zeros(4, bool), 3)
    assert nothing.tolist() == [0, 0, 0]


def test_logit_similarity_is_the_cosine_of_the_true_experts_logit_columns():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 4)) for _ in range(2)]  # E = 3 plus one null column
    mask_T = np.array([True, False, True, True, True])
    routings = [Routing(None, None, None, None, jnp.asarray(a, jnp.float32)) for a in logits]
    got = merge.logit_similarity(routings, mask_T, 3)
    for i in range(3):
        for j in range(3):
            a = np.concatenate([x[mask_T, i] for x in logits])
            b = np.concatenate([x[mask_T, j] for x in logits])
            want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            np.testing.assert_allclose(got[i, j], want, rtol=1e-5)


def _reference_groups(usage, similarity, num_groups):
    """Grouping as a plain loop: dominants by usage (ties: lower index), then each other expert
    to its most similar dominant (ties: lower index)."""
    order = sorted(range(len(usage)), key=lambda e: (-usage[e], e))
    dominants = sorted(order[:num_groups])
    groups = {d: [d] for d in dominants}
    for e in range(len(usage)):
        if e in groups:
            continue
        best = dominants[0]
        for d in dominants:
            if similarity[e][d] > similarity[e][best]:
                best = d
        groups[best].append(e)
    return [groups[d] for d in dominants]


def test_grouping_matches_a_plain_reference():
    usage = np.array([0.1, 0.3, 0.1, 0.25, 0.25, 0.0])
    similarity = np.eye(6)
    similarity[0, [1, 3]] = 0.8  # a tie: expert 0 joins dominant 1, the lower index
    similarity[2, 4] = 0.9
    similarity[5, 1] = -0.2  # all others 0: expert 5 prefers dominant 3
    assert merge.group_experts(usage, similarity, 3) == [[1, 0], [3, 5], [4, 2]]
    assert merge.group_experts(usage, similarity, 6) == [[e] for e in range(6)]
    rng = np.random.default_rng(0)
    for trial in range(20):
        num_experts = int(rng.integers(2, 9))
        usage = rng.integers(0, 4, num_experts) / 4.0  # ties in usage
        similarity = np.round(rng.uniform(-1, 1, (num_experts, num_experts)), 1)
        num_groups = int(rng.integers(1, num_experts + 1))
        want = _reference_groups(usage, similarity, num_groups)
        assert merge.group_experts(usage, similarity, num_groups) == want, trial


def test_weight_matching_recovers_a_known_permutation_of_hidden_units():
    rng = np.random.default_rng(0)
    x_TxD = rng.normal(size=(5, D))
    for _ in range(5):
        dominant = _random_expert(rng)
        p = rng.permutation(F)
        member = merge.permute_hidden_units(dominant, p)  # member unit j is dominant unit p[j]
        np.testing.assert_allclose(_swiglu_mlp(member, x_TxD), _swiglu_mlp(dominant, x_TxD))
        noisy = {n: a + 0.05 * rng.normal(size=a.shape) for n, a in member.items()}
        for candidate in (member, noisy):
            perm = merge.match_hidden_units(dominant, candidate)
            np.testing.assert_array_equal(perm, np.argsort(p))
        aligned = merge.permute_hidden_units(member, np.argsort(p))
        for name in dominant:
            np.testing.assert_array_equal(aligned[name], dominant[name])


def test_merge_layer_averages_aligned_members_and_router_columns_by_usage():
    rng = np.random.default_rng(1)
    base = [_random_expert(rng) for _ in range(3)]
    p = rng.permutation(F)
    # expert 0 is a perturbed copy of expert 1 with its hidden units permuted by p
    noisy_copy = {n: a + 0.05 * rng.normal(size=a.shape) for n, a in base[1].items()}
    base[0] = merge.permute_hidden_units(noisy_copy, p)
    kernel = rng.normal(size=(2, D, 5))  # a chain of two routers; E = 3 plus 2 null columns
    bias = rng.normal(size=(2, 3))
    layer = _layer(base, kernel, {"bias": jnp.asarray(bias, jnp.float32), "budget": 1.5})
    usage = np.array([0.2, 0.5, 0.3])
    out = merge.merge_layer(layer, [[1, 0], [2]], usage)

    aligned0 = merge.permute_hidden_units(base[0], np.argsort(p))
    for name in base[0]:
        got = np.asarray(out.params["experts"][name])
        want0 = (0.5 * base[1][name] + 0.2 * aligned0[name]) / 0.7
        np.testing.assert_allclose(got[0], want0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], base[2][name], rtol=1e-6)
    new_kernel = np.asarray(out.params["router"]["kernel"])
    assert new_kernel.shape == (2, D, 4)
    want = (5 * kernel[..., 1] + 2 * kernel[..., 0]) / 7
    np.testing.assert_allclose(new_kernel[..., 0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_kernel[..., 1], kernel[..., 2], rtol=1e-6)
    np.testing.assert_allclose(new_kernel[..., 2:], kernel[..., 3:], rtol=1e-6)  # null experts
    new_bias = np.asarray(out.state["bias"])
    np.testing.assert_allclose(new_bias[:, 0], (5 * bias[:, 1] + 2 * bias[:, 0]) / 7, rtol=1e-6)
    np.testing.assert_allclose(new_bias[:, 1], bias[:, 2], rtol=1e-6)
    assert out.state["budget"] == 1.5

    unused = merge.merge_layer(layer, [[0, 1, 2]], np.zeros(3))  # never used: equal weights
    np.testing.assert_allclose(
        unused.params["router"]["kernel"][..., 0], kernel[..., :3].mean(-1), rtol=1e-5
    )


# --- whole models -----------------------------------------------------------------------------


def _with_copies(config, variables, seed=0):
    """Every MoE layer made of two groups of exact copies: experts 1 and 3 are experts 0 and 2
    with their hidden units permuted, with the same router columns; expert biases random."""
    rng = np.random.default_rng(seed)
    layers = []
    for w in surgery.moe_layer_weights(config, variables):
        experts = {n: np.array(a) for n, a in w.params["experts"].items()}
        for n, a in experts.items():
            if n.startswith("b_"):
                a[...] = 0.1 * rng.normal(size=a.shape)
        for src, dst in ((0, 1), (2, 3)):
            copy = merge.permute_hidden_units(
                {n: a[src] for n, a in experts.items()}, rng.permutation(F)
            )
            for n, a in experts.items():
                a[dst] = copy[n]
        router = {n: np.array(a) for n, a in w.params["router"].items()}
        for a in router.values():
            a[..., [1, 3]] = a[..., [0, 2]]
        params = {**w.params, "experts": experts, "router": router}
        layers.append(dataclasses.replace(w, params=jax.tree.map(jnp.asarray, params)))
    return surgery.with_experts(config, variables, layers)


def test_merging_groups_of_exact_copies_keeps_the_logits():
    # Top-1 with sigmoid scores: a token's weight is its expert's own score, which the merged
    # group keeps (the router rule keeps identical columns), so nothing is lost. A chain of two
    # routers in the scanned layout.
    router = TopK(k=1, score="sigmoid")
    config, variables, tokens = _model(router, True, 2, expert_bias=True, router_bias=True)
    config, variables = _with_copies(config, variables)
    mask = jnp.ones(tokens.shape, bool).at[1, -3:].set(False)
    new_config, new_variables = merge.merge_experts(config, variables, tokens, mask, 2)
    assert new_config.moe.num_experts == 2
    assert surgery.expert_param_bytes(new_config, new_variables) * 2 == (
        surgery.expert_param_bytes(config, variables)
    )
    want, _ = jax.jit(Transformer(config).apply)(variables, tokens)
    got, _ = jax.jit(Transformer(new_config).apply)(new_variables, tokens)
    np.testing.assert_allclose(got, want, atol=2e-5)
    before = surgery.moe_layer_weights(config, variables)
    for old, new in zip(before, surgery.moe_layer_weights(new_config, new_variables)):
        np.testing.assert_allclose(
            new.params["router"]["kernel"], old.params["router"]["kernel"][..., [0, 2]], atol=1e-6
        )


@pytest.fixture(scope="module")
def biased():
    """A top-2 model with random router logit biases and selection biases."""
    config, variables, tokens = _model(TopK(k=2), router_bias=True)
    layers = []
    for i, w in enumerate(surgery.moe_layer_weights(config, variables)):
        key = jax.random.key(10 + i)
        router = {**w.params["router"], "bias": jax.random.normal(key, (4,))}
        state = {"bias": jax.random.normal(jax.random.fold_in(key, 1), (4,))}
        layers.append(dataclasses.replace(w, params={**w.params, "router": router}, state=state))
    return (*surgery.with_experts(config, variables, layers), tokens)


def test_merging_into_every_expert_is_the_identity_and_merge_method_reads_the_context(biased):
    config, variables, tokens = biased
    context = types.SimpleNamespace(tokens_BxS=tokens, mask_BxS=None)
    new_config, new_variables = merge.merge_method(4)(config, variables, context)
    assert new_config == config
    jax.tree.map(np.testing.assert_array_equal, new_variables, variables)


def test_merged_logits_are_usage_weighted_means_of_the_members_logits(biased):
    config, variables, tokens = biased
    mask_BxS = jnp.ones(tokens.shape, bool).at[0, :4].set(False)
    new_config, new_variables = merge.merge_experts(config, variables, tokens, mask_BxS, 2)

    (routing,) = layer_routings(config, variables, tokens)[0]  # layer 0 sees the same input
    mask_T = np.asarray(mask_BxS).reshape(-1)
    usage = merge.expert_usage([routing], mask_T, 4)
    groups = merge.group_experts(usage, merge.logit_similarity([routing], mask_T, 4), 2)
    assert sorted(e for g in groups for e in g) == [0, 1, 2, 3]
    (merged,) = layer_routings(new_config, new_variables, tokens)[0]
    old_bias = np.asarray(surgery.moe_layer_weights(config, variables)[0].state["bias"])
    new_bias = np.asarray(surgery.moe_layer_weights(new_config, new_variables)[0].state["bias"])
    for g, group in enumerate(groups):
        w = usage[group] / usage[group].sum()
        want = np.asarray(routing.logits)[:, group] @ w
        np.testing.assert_allclose(merged.logits[:, g], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new_bias[g], old_bias[group] @ w, rtol=1e-5)


def test_bad_merges_name_the_problem(biased):
    config, variables, tokens = biased
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match=r"num_groups=.* must be an integer in \[1, "):
            merge.merge_experts(config, variables, tokens, None, bad)
    with pytest.raises(ValueError, match="num_groups=1 is too few experts for the router.*k"):
        merge.merge_experts(config, variables, tokens, None, 1)
    with pytest.raises(ValueError, match="at least one calibration token"):
        merge.merge_experts(config, variables, tokens, jnp.zeros(tokens.shape, bool), 2)
    rng = np.random.default_rng(0)
    quantized = _layer([_random_expert(rng, ("w_up", "w_up_scale"))] * 2, np.zeros((D, 2)))
    with pytest.raises(ValueError, match="'w_up_scale' is not one of"):
        merge.merge_layer(quantized, [[0, 1]], np.ones(2))
    layer = surgery.moe_layer_weights(config, variables)[0]
    for groups in ([[0, 1], [2]], [[0, 1], [1, 2, 3]], [[0, 1, 2, 3], []]):
        with pytest.raises(ValueError, match="must be non-empty and hold each expert"):
            merge.merge_layer(layer, groups, np.ones(4))
