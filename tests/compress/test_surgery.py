"""`jmoe.compress.surgery`: keeping a subset of experts gives an ordinary model whose outputs
match the original wherever no token routed to a removed expert."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.compress import surgery
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import NullExperts, TopK


def _model(scan_layers=False, router=TopK(k=2), num_experts=4):
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=num_experts, router=router)
    config = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=16,
        moe=moe,
        scan_layers=scan_layers,
    )
    tokens = jnp.arange(12).reshape(2, 6) % 32
    return config, Transformer(config).init(jax.random.key(0), tokens), tokens


@pytest.mark.parametrize("scan_layers", [False, True])
def test_keeping_every_expert_in_a_new_order_keeps_the_outputs(scan_layers):
    config, variables, tokens = _model(scan_layers)
    order = [2, 0, 3, 1]
    layers = [surgery.take_experts(w, order) for w in surgery.moe_layer_weights(config, variables)]
    new_config, new_variables = surgery.with_experts(config, variables, layers)
    assert jax.tree.map(jnp.shape, new_variables) == jax.tree.map(jnp.shape, variables)
    want, _ = Transformer(config).apply(variables, tokens)
    got, _ = Transformer(new_config).apply(new_variables, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
    w0 = surgery.moe_layer_weights(new_config, new_variables)[0]
    ref = surgery.moe_layer_weights(config, variables)[0]
    np.testing.assert_array_equal(w0.params["experts"]["w_up"][0], ref.params["experts"]["w_up"][2])


def test_null_expert_columns_stay_last_and_expert_bytes_shrink():
    config, variables, _ = _model(router=NullExperts(k=2, num_null=2))
    layers = [surgery.take_experts(w, [3, 1]) for w in surgery.moe_layer_weights(config, variables)]
    new_config, new_variables = surgery.with_experts(config, variables, layers)
    assert new_config.moe.num_experts == 2 and new_config.moe.num_router_outputs == 4
    kernel = surgery.moe_layer_weights(config, variables)[1].params["router"]["kernel"]
    new_kernel = surgery.moe_layer_weights(new_config, new_variables)[1].params["router"]["kernel"]
    np.testing.assert_array_equal(new_kernel, kernel[:, [3, 1, 4, 5]])
    assert surgery.expert_param_bytes(new_config, new_variables) * 2 == surgery.expert_param_bytes(
        config, variables
    )


def test_bad_rewrites_name_the_problem():
    config, variables, _ = _model()
    weights = surgery.moe_layer_weights(config, variables)
    with pytest.raises(ValueError, match="distinct ids"):
        surgery.take_experts(weights[0], [0, 0])
    with pytest.raises(ValueError, match="distinct ids"):
        surgery.take_experts(weights[0], [4])
    with pytest.raises(ValueError, match="each MoE layer"):
        surgery.with_experts(config, variables, weights[:1])
    uneven = [surgery.take_experts(weights[0], [0, 1]), surgery.take_experts(weights[1], [0, 1, 2])]
    with pytest.raises(ValueError, match="same expert count"):
        surgery.with_experts(config, variables, uneven)
    with pytest.raises(ValueError, match="k"):
        surgery.with_experts(config, variables, [surgery.take_experts(w, [0]) for w in weights])


def test_layer_routings_match_the_top_k_of_their_logits_in_either_layout():
    from jmoe.compress.trace import layer_routings
    from jmoe.lm.param_layout import stack_layers

    config, variables, tokens = _model()
    scanned = dataclasses.replace(config, scan_layers=True)
    scanned_variables = {k: stack_layers(scanned, v) for k, v in variables.items()}
    routings = layer_routings(config, variables, tokens)
    assert sorted(routings) == [0, 1]
    for layer, (routing,) in routings.items():
        assert routing.logits.shape == (12, 4) and routing.expert_ids.shape == (12, 2)
        top2 = np.argsort(-np.asarray(routing.logits), axis=-1, kind="stable")[:, :2]
        np.testing.assert_array_equal(np.sort(routing.expert_ids, -1), np.sort(top2, -1))
        (same,) = layer_routings(scanned, scanned_variables, tokens)[layer]
        np.testing.assert_allclose(same.logits, routing.logits, atol=1e-5)
    # the two layers see different inputs, so their logits differ
    assert not np.allclose(routings[0][0].logits, routings[1][0].logits)
