"""Upcycling (`jmoe.moe.upcycle`, `jmoe.lm.upcycle`): the properties the docstrings state, checked
against the dense FFN / the model before the change, layer and whole model, both layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.lm import upcycle as lm_upcycle
from jmoe.lm.model import Transformer
from jmoe.moe import upcycle

D, F, E = 8, 16, 4
X = jax.random.normal(jax.random.key(0), (2, 5, D))


def _dense():
    mlp = jmoe.SharedMLP(F)
    params = mlp.init(jax.random.key(1), X)["params"]
    return params, mlp.apply({"params": params}, X)


def _upcycled(cfg, noise_std=0.0):
    dense, y_dense = _dense()
    template = jmoe.MoE(cfg).init(jax.random.key(2), X)
    params = upcycle.upcycle_layer(
        dense, template["params"], noise_std=noise_std, rng=jax.random.key(3)
    )
    return dense, y_dense, {**template, "params": params}


@pytest.mark.parametrize(
    "router,factor",
    [
        (jmoe.TopK(k=2), 1.0),
        (jmoe.TopK(k=3, score="sigmoid"), 1.0),
        (jmoe.TopK(k=2, normalize=False), 2 / E),  # softmax weights 1 / E each
        (jmoe.TopK(k=3, score="sigmoid", normalize=False), 1.5),  # sigmoid(0) = 1/2 each
        (jmoe.NullExperts(k=2, num_null=2), 1.0),
    ],
)
def test_upcycled_layer_reproduces_the_dense_ffn(router, factor):
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=E, router=router, expert_bias=True, router_bias=True,
        num_shared=1, shared_gate=True,
    )  # fmt: skip
    dense, y_dense, variables = _upcycled(cfg)
    y, stats = jmoe.MoE(cfg).apply(variables, X)
    np.testing.assert_allclose(y, factor * y_dense, rtol=1e-5, atol=1e-6)
    for name in ("w_gate", "w_up", "w_down"):
        for e in range(E):
            np.testing.assert_array_equal(variables["params"]["experts"][name][e], dense[name])
    assert not variables["params"]["router"]["kernel"].any()
    np.testing.assert_allclose(stats["entropy"], np.log(cfg.num_router_outputs), rtol=1e-5)


def test_upcycle_noise_and_errors():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E)
    dense, y_dense, variables = _upcycled(cfg, noise_std=0.01)
    w = variables["params"]["experts"]["w_up"]
    diff = np.asarray(w - dense["w_up"][None])
    assert 0.005 < diff.std() < 0.02 and not np.allclose(w[0], w[1])
    y, _ = jmoe.MoE(cfg).apply(variables, X)
    np.testing.assert_allclose(y, y_dense, atol=0.2)
    template = jmoe.MoE(dataclasses.replace(cfg, d_ff=8)).init(jax.random.key(2), X)["params"]
    with pytest.raises(ValueError, match="d_ff must equal"):
        upcycle.upcycle_layer(dense, template)
    template = jmoe.MoE(cfg).init(jax.random.key(2), X)["params"]
    with pytest.raises(ValueError, match="needs an rng"):
        upcycle.upcycle_layer(dense, template, noise_std=0.1)


def _moe_layer(cfg, seed=4):
    variables = jmoe.MoE(cfg).init(jax.random.key(seed), X)
    params = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                          variables["params"])  # fmt: skip
    return {**variables, "params": params}


def test_grown_layer_keeps_outputs_when_every_expert_is_copied_and_k_scales():
    """E=4 -> 8 (round robin: every expert once more) with k=2 -> 4: each token picks both copies
    of its two experts, and the renormalised weights give the same output."""
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, router=jmoe.TopK(k=2), expert_bias=True,
                         router_bias=True)  # fmt: skip
    variables = _moe_layer(cfg)
    y, _ = jmoe.MoE(cfg).apply(variables, X)
    params, state = upcycle.grow_experts(variables["params"], variables["moe_state"], 2 * E)
    big = dataclasses.replace(cfg, num_experts=2 * E, router=jmoe.TopK(k=4))
    y_big, _ = jmoe.MoE(big).apply({"params": params, "moe_state": state}, X)
    np.testing.assert_allclose(y_big, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["experts"]["b_up"][E + 1], params["experts"]["b_up"][1])
    np.testing.assert_array_equal(
        params["router"]["kernel"][:, E + 3], params["router"]["kernel"][:, 3]
    )
    # same k: copies tie with their source and crowd out the second expert, so the output moves
    y_same_k, _ = jmoe.MoE(dataclasses.replace(big, router=jmoe.TopK(k=2))).apply(
        {"params": params, "moe_state": state}, X
    )
    assert not np.allclose(y_same_k, y, atol=1e-4)


def test_grown_layer_k1_source_noise_and_null_experts():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E,
                         router=jmoe.TopK(k=1, renorm_when_k1=True))  # fmt: skip
    variables = _moe_layer(cfg)
    y, _ = jmoe.MoE(cfg).apply(variables, X)
    params, state = upcycle.grow_experts(
        variables["params"], variables["moe_state"], 6, source=[2, 2]
    )
    np.testing.assert_array_equal(params["experts"]["w_gate"][5], params["experts"]["w_gate"][2])
    big = dataclasses.replace(cfg, num_experts=6)
    y_big, _ = jmoe.MoE(big).apply({"params": params, "moe_state": state}, X)
    np.testing.assert_allclose(y_big, y, rtol=1e-5, atol=1e-6)  # k = 1: the source wins its tie
    noisy, _ = upcycle.grow_experts(variables["params"], variables["moe_state"], 6, noise_std=0.1,
                                    rng=jax.random.key(0))  # fmt: skip
    kernel = noisy["router"]["kernel"]
    assert not np.allclose(kernel[:, 4], kernel[:, 0]) and np.allclose(
        kernel[:, :4], params["router"]["kernel"][:, :4]
    )
    with pytest.raises(ValueError, match="source"):
        upcycle.grow_experts(variables["params"], {}, 6, source=[0, 9])
    # null experts keep their columns last: grow a NullExperts layer, then add more null experts
    null_cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, router_bias=True,
                              router=jmoe.NullExperts(k=2, num_null=2))  # fmt: skip
    null_vars = _moe_layer(null_cfg)
    grown, _ = upcycle.grow_experts(null_vars["params"], {}, 5)
    kernel = grown["router"]["kernel"]
    np.testing.assert_array_equal(kernel[:, 4], null_vars["params"]["router"]["kernel"][:, 0])
    np.testing.assert_array_equal(kernel[:, 5:], null_vars["params"]["router"]["kernel"][:, 4:])
    with_null = jmoe.with_null_experts(grown, 1)
    assert with_null["router"]["bias"].shape == (8,)
    out, _ = jmoe.MoE(
        dataclasses.replace(null_cfg, num_experts=5, router=jmoe.NullExperts(k=2, num_null=3))
    ).apply({"params": with_null}, X)
    assert np.isfinite(out).all()


def _model_cfg(**kw):
    moe = jmoe.MoEConfig(d_ff=48, num_experts=4, router=jmoe.TopK(k=2))
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=48, max_seq_len=16, moe=moe)
    return jmoe.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("dense_scan,moe_scan", [(False, True), (True, False)])
def test_upcycled_model_reproduces_the_dense_model(dense_scan, moe_scan):
    dense_cfg = _model_cfg(moe_every=0, scan_layers=dense_scan)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 32)
    dense_vars = Transformer(dense_cfg).init(jax.random.key(1), tokens)
    want, _ = Transformer(dense_cfg).apply(dense_vars, tokens)
    cfg = _model_cfg(moe_every=2, first_dense_layers=0, scan_layers=moe_scan)
    variables = lm_upcycle.upcycle_model(dense_cfg, dense_vars, cfg, jax.random.key(2))
    got, _ = Transformer(cfg).apply(variables, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if dense_scan:
        return  # the rest once, in the scanned MoE layout
    # then null experts (AdaMoE) and more experts: still the dense model's logits
    null_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=jmoe.NullExperts(k=2, num_null=2)))  # fmt: skip
    params = lm_upcycle.map_moe_layers(lambda p: jmoe.with_null_experts(p, 2), variables["params"])
    got, _ = Transformer(null_cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grown = lm_upcycle.grow_model_experts(variables, 8, noise_std=0.0)
    big_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=8,
                                                               router=jmoe.TopK(k=4)))  # fmt: skip
    got, _ = Transformer(big_cfg).apply(grown, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upcycle_model_refuses_other_changes():
    dense_cfg = _model_cfg(moe_every=0)
    dense_vars = Transformer(dense_cfg).init(jax.random.key(1), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="n_heads"):
        lm_upcycle.upcycle_model(dense_cfg, dense_vars, _model_cfg(n_heads=4), jax.random.key(0))
    gelu = _model_cfg(moe=dataclasses.replace(_model_cfg().moe, activation="gelu"))
    with pytest.raises(ValueError, match='activation="swiglu"'):
        lm_upcycle.upcycle_model(dense_cfg, dense_vars, gelu, jax.random.key(0))
    with pytest.raises(ValueError, match="moe_every=0"):
        lm_upcycle.upcycle_model(_model_cfg(), dense_vars, _model_cfg(), jax.random.key(0))
