"""`jmoe.compress.prune`: keeping the r best experts per layer gives an ordinary model that
computes what the original did for tokens no pruned expert served."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prune_cases import E, set_moe, tiny_model

from jmoe.compress import surgery
from jmoe.compress.prune import kept_experts, prune_experts
from jmoe.compress.router_stats import RouterStats, router_stats
from jmoe.lm.model import Transformer
from jmoe.moe.routers import NullExperts, TopP


def logits(config, variables, tokens):
    return np.asarray(jax.jit(Transformer(config).apply)(variables, tokens)[0])


@pytest.fixture(scope="module")
def model():
    config, variables, tokens = tiny_model()
    # Experts 4 and 5 get a hopeless logit bias: no token routes to them.
    variables = set_moe(variables, "params/router/bias", lambda b: b.at[4:].set(-1e4))
    # A distinct selection bias per expert, to see it follow its expert.
    variables = set_moe(variables, "moe_state/bias", lambda b: jnp.arange(E) * 1e-4)
    return config, variables, tokens, router_stats(config, variables, tokens, confidence=0.05)


def test_keeping_every_expert_is_the_identity(model):
    config, variables, tokens, stats = model
    new_config, new_variables = prune_experts(config, variables, stats, keep=E)
    assert new_config == config
    np.testing.assert_allclose(
        logits(new_config, new_variables, tokens), logits(config, variables, tokens), atol=1e-6
    )


@pytest.mark.parametrize("score", ["tcess", "frequency", "weight"])
def test_pruning_unused_experts_keeps_the_logits_and_the_selection_bias(model, score):
    config, variables, tokens, stats = model
    assert (stats.frequency[:, 4:] == 0).all() and (stats.tcess[:, 4:] == 0).all()
    new_config, new_variables = prune_experts(config, variables, stats, keep=4, score=score)
    assert new_config.moe.num_experts == 4
    np.testing.assert_allclose(
        logits(new_config, new_variables, tokens), logits(config, variables, tokens), atol=1e-5
    )
    bias = new_variables["moe_state"]["layers_1"]["moe"]["bias"]
    np.testing.assert_allclose(bias, np.arange(4) * 1e-4)
    assert surgery.expert_param_bytes(new_config, new_variables) * 3 == 2 * (
        surgery.expert_param_bytes(config, variables)
    )


def test_kept_ids_match_a_sort_by_score_with_ties_to_the_lower_id():
    rng = np.random.default_rng(3)
    tcess = rng.random((3, 8)).round(1)  # rounding makes ties
    stats = RouterStats(
        layers=(0, 1, 2),
        frequency=rng.random((3, 8)),
        mean_weight=rng.random((3, 8)),
        tcess=tcess,
        null_frequency=np.zeros(3),
        num_tokens=10,
        confidence=0.1,
        top_k=2,
    )
    for keep in (1, 3, 8):
        want = [sorted(sorted(range(8), key=lambda e: (-row[e], e))[:keep]) for row in tcess]
        np.testing.assert_array_equal(kept_experts(stats, keep, "tcess"), want)
    weight = stats.frequency * stats.mean_weight
    want = [sorted(sorted(range(8), key=lambda e: -row[e])[:3]) for row in weight]
    np.testing.assert_array_equal(kept_experts(stats, 3, "weight"), want)


def test_a_pruned_model_serves_and_trains(model):
    config, variables, tokens, stats = model
    # Prune used experts too: different experts per layer, all of them routed to before.
    stats = dataclasses.replace(stats, tcess=np.array([[0, 5, 4, 3, 2, 1], [5, 0, 1, 2, 3, 4]]))
    new_config, new_variables = prune_experts(config, variables, stats, keep=2)
    w = surgery.moe_layer_weights(new_config, new_variables)
    old = surgery.moe_layer_weights(config, variables)
    np.testing.assert_array_equal(
        w[0].params["experts"]["w_up"], np.asarray(old[0].params["experts"]["w_up"])[[1, 2]]
    )
    np.testing.assert_array_equal(
        w[1].params["router"]["kernel"], np.asarray(old[1].params["router"]["kernel"])[:, [0, 5]]
    )
    model_ = Transformer(new_config)

    def loss(params):
        out, aux = model_.apply({**new_variables, "params": params}, tokens, deterministic=False)
        return jax.nn.log_softmax(out).mean() + aux["aux_loss"]

    value, grads = jax.jit(jax.value_and_grad(loss))(new_variables["params"])
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["layers_0"]["moe"]["experts"]["w_up"]).sum() > 0


def test_bad_pruning_requests_name_the_bound(model):
    config, variables, _, stats = model
    for keep, match in [(E + 1, r"\[1, E=6\]"), (0, r"\[1, E=6\]"), (1, r"TopK.k.*\[2, 3, 4")]:
        with pytest.raises(ValueError, match=match):
            prune_experts(config, variables, stats, keep=keep)
    with pytest.raises(ValueError, match="score='loss'"):
        prune_experts(config, variables, stats, keep=2, score="loss")
    with pytest.raises(ValueError, match="one MoEConfig"):
        prune_experts(config, variables, stats, keep=2, budget="global")
    top_p = dataclasses.replace(config, moe=dataclasses.replace(config.moe, router=TopP(max_k=3)))
    with pytest.raises(ValueError, match=r"max_k.*allows keep in \[3, 4, 5, 6\]"):
        prune_experts(top_p, variables, stats, keep=2)
    null = dataclasses.replace(
        config, moe=dataclasses.replace(config.moe, router=NullExperts(k=4, num_null=1))
    )
    with pytest.raises(ValueError, match="num_null"):
        prune_experts(null, variables, stats, keep=2)
    other = dataclasses.replace(stats, layers=(0,))
    with pytest.raises(ValueError, match="compute them on this model"):
        prune_experts(config, variables, other, keep=2)
