"""jmoe.MoE against the per-token loop reference of tests/moe_reference.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import jmoe
import moe_reference as ref

D, F = 8, 16
B, S = 2, 6

GPT_OSS = dict(
    router_bias=True,
    expert_bias=True,
    activation="clamped_swiglu",
    swiglu_limit=0.5,
    swiglu_alpha=1.5,
)
VARIANTS = {
    "mixtral_top2": dict(num_experts=4, router=jmoe.TopK(k=2)),
    "switch_k1": dict(num_experts=4, router=jmoe.TopK(k=1, normalize=False)),
    "k_equals_e": dict(num_experts=4, router=jmoe.TopK(k=4)),
    "qwen_no_norm_shared_gate": dict(
        num_experts=6, num_shared=1, shared_gate=True, router=jmoe.TopK(k=2, normalize=False)
    ),
    "deepseek_v3": dict(
        num_experts=8,
        num_shared=2,
        router=jmoe.TopK(k=2, score="sigmoid", scale=2.5, n_groups=4, top_groups=2),
    ),
    "gelu": dict(num_experts=4, activation="gelu", router=jmoe.TopK(k=2)),
    "relu_shared_width": dict(
        num_experts=4, activation="relu", d_ff_shared=12, router=jmoe.TopK(k=2)
    ),
    "capacity_drops": dict(num_experts=4, capacity_factor=0.5, router=jmoe.TopK(k=2)),
    "deepseek_v2_group_max": dict(
        num_experts=8,
        router=jmoe.TopK(k=3, score="sigmoid", n_groups=4, top_groups=2, group_score="max"),
    ),
    # GPT-OSS: router and expert biases, clamped SwiGLU (a low limit, so the clamps bite); with
    # capacity drops no bias may reach a dropped slot
    "gpt_oss": dict(num_experts=4, router=jmoe.TopK(k=2), **GPT_OSS),
    "gpt_oss_capacity_drops": dict(
        num_experts=4, capacity_factor=0.5, router=jmoe.TopK(k=2), **GPT_OSS
    ),
}


def _setup(cfg: jmoe.MoEConfig, seed=0, bias_scale=0.0):
    x = jax.random.normal(jax.random.key(seed), (B, S, cfg.d_model))
    variables = jmoe.MoE(cfg).init(jax.random.key(seed + 1), x)
    bias = bias_scale * jax.random.normal(jax.random.key(seed + 2), (cfg.num_experts,))
    # learned biases start at zero: give them values, so the test sees them
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            0.5 * jax.random.normal(jax.random.key(seed + 3 + a.size), a.shape)
            if jax.tree_util.keystr(path).endswith(
                ("['bias']", "['b_gate']", "['b_up']", "['b_down']")
            )
            else a
        ),
        variables["params"],
    )
    variables = {**variables, "params": params, "moe_state": {"bias": bias}}
    return x, variables


def _reference(cfg, variables, x):
    """Reference ids / kept mask and the differentiable reference output."""
    x_TxD = np.asarray(x).reshape(-1, cfg.d_model)
    logits = x_TxD @ np.asarray(variables["params"]["router"]["kernel"])
    if cfg.router_bias:
        logits = logits + np.asarray(variables["params"]["router"]["bias"])
    ids, _, _ = ref.ref_top_k(
        logits,
        cfg.router.k,
        score=cfg.router.score,
        normalize=cfg.router.normalize,
        scale=cfg.router.scale,
        bias=np.asarray(variables["moe_state"]["bias"]),
        n_groups=cfg.router.n_groups,
        top_groups=cfg.router.top_groups,
        renorm_when_k1=cfg.router.renorm_when_k1,
        group_score=cfg.router.group_score,
    )
    kept = np.ones(ids.shape, bool)
    capacity = cfg.capacity(x_TxD.shape[0], deterministic=True)
    if capacity is not None:
        kept = ref.ref_capacity(ids, cfg.num_experts, capacity)
    cfg_dict = dataclasses.asdict(cfg)

    def fn(params, x):
        return ref.ref_moe(params, x.reshape(-1, cfg.d_model), cfg_dict, ids, kept).reshape(x.shape)

    return ids, kept, logits, fn


_REFERENCE_CACHE = {}


def _reference_output_and_grads(name, ref_fn, params, x, ct):
    """Reference output and grads of sum(y * ct) w.r.t. (params, x); the per-token loop is slow,
    and every implementation of a variant shares the same inputs, so it runs once per variant."""
    if name not in _REFERENCE_CACHE:
        y = ref_fn(params, x)
        grads = jax.grad(lambda p, x: jnp.sum(ref_fn(p, x) * ct), (0, 1))(params, x)
        _REFERENCE_CACHE[name] = (y, grads)
    return _REFERENCE_CACHE[name]


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_matches_reference(name, impl):
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, implementation=impl, **VARIANTS[name])
    x, variables = _setup(cfg, bias_scale=0.3 if cfg.router.score == "sigmoid" else 0.0)
    ids, kept, logits, ref_fn = _reference(cfg, variables, x)
    model = jmoe.MoE(cfg)
    y, stats = jax.jit(model.apply)(variables, x)
    ct = jax.random.normal(jax.random.key(7), y.shape)
    want_y, want = _reference_output_and_grads(name, ref_fn, variables["params"], x, ct)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)

    def loss(params, x):
        return jnp.sum(model.apply({**variables, "params": params}, x)[0] * ct)

    got = jax.jit(jax.grad(loss, (0, 1)))(variables["params"], x)
    for path, g, w in zip(
        jax.tree_util.tree_leaves_with_path(got),
        jax.tree.leaves(got),
        jax.tree.leaves(want),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=str(path[0]))

    counts = np.zeros(cfg.num_experts)
    np.add.at(counts, ids.reshape(-1), 1.0)
    np.testing.assert_allclose(stats["tokens_per_expert"], counts)
    probs = ref.ref_scores(logits, cfg.router.score)
    want_lb = ref.ref_load_balance(
        ids, np.ones(ids.shape, bool), probs, cfg.num_experts, cfg.lb_normalization
    )
    np.testing.assert_allclose(stats["load_balance_loss"], want_lb, rtol=1e-5)
    np.testing.assert_allclose(stats["z_loss"], ref.ref_z_loss(logits), rtol=1e-5)
    np.testing.assert_allclose(stats["active_experts"], kept.sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.mean(), rtol=1e-6, atol=1e-7)
    want_aux = cfg.lb_coef * want_lb + cfg.z_loss_coef * ref.ref_z_loss(logits)
    np.testing.assert_allclose(stats["aux_loss"], want_aux, rtol=1e-5)


def test_capacity_without_drops_equals_dropless():
    base = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2))
    roomy = dataclasses.replace(base, capacity_factor=4.0)  # capacity = T * k / E * 4 >= T
    x, variables = _setup(base)
    y0, s0 = jmoe.MoE(base).apply(variables, x)
    y1, s1 = jmoe.MoE(roomy).apply(variables, x)
    np.testing.assert_array_equal(y0, y1)
    assert float(s1["dropped_fraction"]) == 0.0


def test_eval_capacity_factor_applies_when_deterministic():
    cfg = jmoe.MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=4,
        capacity_factor=0.25,
        eval_capacity_factor=4.0,
        router=jmoe.TopK(k=2),
    )
    x, variables = _setup(cfg)
    _, train_stats = jmoe.MoE(cfg).apply(variables, x, deterministic=False)
    _, eval_stats = jmoe.MoE(cfg).apply(variables, x, deterministic=True)
    assert float(train_stats["dropped_fraction"]) > 0.3
    assert float(eval_stats["dropped_fraction"]) == 0.0


def test_bias_changes_selection_not_weights():
    """A large selection bias forces experts; the combine weights stay unbiased scores."""
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2, score="sigmoid", normalize=False)
    )
    x, variables = _setup(cfg)
    variables["moe_state"]["bias"] = jnp.array([0.0, 0.0, 5.0, 5.0])
    _, stats = jmoe.MoE(cfg).apply(variables, x)
    np.testing.assert_array_equal(stats["tokens_per_expert"], [0, 0, B * S, B * S])
    ids, _, _, ref_fn = _reference(cfg, variables, x)
    assert set(ids.reshape(-1).tolist()) == {2, 3}
    y, _ = jmoe.MoE(cfg).apply(variables, x)
    np.testing.assert_allclose(y, ref_fn(variables["params"], x), rtol=1e-5, atol=1e-5)


def test_token_mask_excludes_padding_from_losses():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2))
    x, variables = _setup(cfg)
    mask = np.ones((B, S), bool)
    mask[1, 3:] = False
    ids, _, logits, _ = _reference(cfg, variables, x)
    _, stats = jmoe.MoE(cfg).apply(variables, x, token_mask=jnp.asarray(mask))
    m = mask.reshape(-1)
    probs = ref.ref_scores(logits, cfg.router.score)
    want = ref.ref_load_balance(
        ids, np.ones(ids.shape, bool), probs, 4, cfg.lb_normalization, token_mask=m
    )
    np.testing.assert_allclose(stats["load_balance_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(stats["z_loss"], ref.ref_z_loss(logits, token_mask=m), rtol=1e-5)
    counts = np.zeros(4)
    np.add.at(counts, ids[m].reshape(-1), 1.0)
    np.testing.assert_allclose(stats["tokens_per_expert"], counts)


def test_parameter_tree_matches_contract():
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=6, num_shared=2, shared_gate=True, router=jmoe.TopK(k=2)
    )
    _, variables = _setup(cfg)
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes == {
        "params": {
            "router": {"kernel": (D, 6)},
            "experts": {"w_gate": (6, D, F), "w_up": (6, D, F), "w_down": (6, F, D)},
            "shared": {"w_gate": (D, 2 * F), "w_up": (D, 2 * F), "w_down": (2 * F, D)},
            "shared_gate": {"kernel": (D, 1)},
        },
        "moe_state": {"bias": (6,)},
    }
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_bfloat16_compute_keeps_float32_router_and_params():
    f32 = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2))
    bf16 = dataclasses.replace(f32, dtype="bfloat16")
    x, variables = _setup(f32)
    y32, s32 = jmoe.MoE(f32).apply(variables, x)
    y16, s16 = jmoe.MoE(bf16).apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(s16["tokens_per_expert"], s32["tokens_per_expert"])
    np.testing.assert_allclose(s16["z_loss"], s32["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)
    grads = jax.grad(lambda p: jnp.sum(jmoe.MoE(bf16).apply({**variables, "params": p}, x)[0]))(
        variables["params"]
    )
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_router_jitter_only_when_not_deterministic():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router_jitter=0.5, router=jmoe.TopK(k=2))
    x, variables = _setup(cfg)
    plain = dataclasses.replace(cfg, router_jitter=0.0)
    y_det, _ = jmoe.MoE(cfg).apply(variables, x, deterministic=True)
    y_plain, _ = jmoe.MoE(plain).apply(variables, x, deterministic=False)
    np.testing.assert_array_equal(y_det, y_plain)
    y_a, s_a = jmoe.MoE(cfg).apply(
        variables, x, deterministic=False, rngs={"jitter": jax.random.key(0)}
    )
    y_b, _ = jmoe.MoE(cfg).apply(
        variables, x, deterministic=False, rngs={"jitter": jax.random.key(1)}
    )
    assert not np.allclose(s_a["z_loss"], jmoe.MoE(cfg).apply(variables, x)[1]["z_loss"])
    assert not np.allclose(y_a, y_b)


def test_wrong_width_raises_and_single_expert_mesh_runs():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2))
    x, variables = _setup(cfg)
    with pytest.raises(ValueError, match="d_model=8"):
        jmoe.MoE(cfg).apply(variables, jnp.ones((2, D + 1)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "expert"))
    y, _ = jmoe.MoE(cfg, mesh=mesh).apply(variables, x)
    np.testing.assert_array_equal(y, jmoe.MoE(cfg).apply(variables, x)[0])


def test_nnx_bridge_wraps_the_linen_module():
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, num_shared=1, router=jmoe.TopK(k=2))
    x = jax.random.normal(jax.random.key(0), (B, S, D))
    layer = bridge.ToNNX(jmoe.MoE(cfg), rngs=nnx.Rngs(0))
    bridge.lazy_init(layer, x)
    y, stats = layer(x)
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert params["experts"]["w_gate"].shape == (4, D, F)
    linen_vars = {"params": params, "moe_state": {"bias": jnp.zeros(4)}}
    y_linen, _ = jmoe.MoE(cfg).apply(linen_vars, x)
    np.testing.assert_allclose(y, y_linen, rtol=1e-6, atol=1e-6)
    assert stats["tokens_per_expert"].shape == (4,)


def test_with_null_experts_copies_true_router_columns():
    top_k_cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2))
    x, variables = _setup(top_k_cfg)
    params = jmoe.with_null_experts(variables["params"], num_null=6)
    kernel = np.asarray(variables["params"]["router"]["kernel"])
    new = np.asarray(params["router"]["kernel"])
    assert new.shape == (D, 10)
    np.testing.assert_array_equal(new[:, :4], kernel)
    np.testing.assert_array_equal(new[:, 4:], kernel[:, [0, 1, 2, 3, 0, 1]])
    assert params["experts"] is variables["params"]["experts"]
    null_cfg = dataclasses.replace(top_k_cfg, router=jmoe.NullExperts(num_null=6, k=4))
    _, stats = jmoe.MoE(null_cfg).apply({"params": params, "moe_state": variables["moe_state"]}, x)
    # Null columns tie with their true twins (ties go to the true expert, the lower index), so
    # the converted model picks each token's best true experts followed by their twins.
    logits = np.asarray(x).reshape(-1, D) @ new
    ids, _, _, _, _ = ref.ref_null_experts(logits, 4, num_null=6)
    np.testing.assert_allclose(stats["active_experts"], (ids < 4).sum(-1).mean(), rtol=1e-6)
    assert (ids[:, 0] < 4).all()
    with pytest.raises(ValueError, match="num_null=-1"):
        jmoe.with_null_experts(variables["params"], num_null=-1)


def test_update_state_applies_bias_and_budget_rules():
    stats = {
        "tokens_per_expert": jnp.array([4.0, 1.0, 2.0, 1.0]),
        "active_experts": jnp.asarray(1.9),
    }
    biased = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=4, router=jmoe.TopK(k=2, bias_update_rate=0.1)
    )
    new = jmoe.update_state(biased, {"bias": jnp.zeros(4)}, stats)
    np.testing.assert_allclose(new["bias"], [-0.1, 0.1, 0.0, 0.1])
    budgeted = jmoe.MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=4,
        router=jmoe.NullExperts(k=2, num_null=2, target_active_experts=1.5, budget_rate=0.5),
    )
    state = {"bias": jnp.zeros(4), "budget": jnp.asarray(0.25)}
    new = jmoe.update_state(budgeted, state, stats)
    np.testing.assert_allclose(new["budget"], 0.25 + 0.5 * (1.9 - 1.5), rtol=1e-6)
    np.testing.assert_array_equal(new["bias"], state["bias"])  # bias rate 0: unchanged
    unbudgeted = jmoe.NullExperts(k=2, num_null=2, budget_rate=0.5)
    still = jmoe.update_state(dataclasses.replace(budgeted, router=unbudgeted), state, stats)
    np.testing.assert_array_equal(still["budget"], state["budget"])


def test_capacity_zero_drops_everything_and_outputs_zero():
    cfg = jmoe.MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=4,
        capacity_factor=0.1,
        capacity_rounding="floor",
        router=jmoe.TopK(k=2),
    )
    assert cfg.capacity(B * S, deterministic=True) == 0
    x, variables = _setup(cfg)
    y, stats = jmoe.MoE(cfg).apply(variables, x)
    np.testing.assert_array_equal(y, np.zeros_like(y))
    assert float(stats["dropped_fraction"]) == 1.0


def test_dropped_fraction_counts_real_tokens_only():
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=4, capacity_factor=0.5, router=jmoe.TopK(k=2)
    )
    x, variables = _setup(cfg)
    ids, kept, _, _ = _reference(cfg, variables, x)
    mask = np.ones((B, S), bool)
    mask[0, :4] = False
    m = mask.reshape(-1)
    _, stats = jmoe.MoE(cfg).apply(variables, x, token_mask=jnp.asarray(mask))
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept[m].mean(), rtol=1e-6)
    assert 1 - kept[m].mean() != 1 - kept.mean()  # the mask matters in this case


def test_routing_is_returned_as_an_intermediate():
    """`mutable=["intermediates"]` returns each chain step's `Routing`: the router's top-k."""
    cfg = jmoe.MoEConfig(d_model=8, d_ff=16, num_experts=4, chain_steps=2, router=jmoe.TopK(k=2))
    x = jax.random.normal(jax.random.key(0), (3, 8))
    variables = jmoe.MoE(cfg).init(jax.random.key(1), x)
    (y, _), sown = jmoe.MoE(cfg).apply(variables, x, mutable=["intermediates"])
    first, second = sown["intermediates"]["routing"]
    kernel = variables["params"]["router"]["kernel"][0]
    expected = jmoe.routing.top_k(x @ kernel, 2)
    np.testing.assert_array_equal(first.expert_ids, expected.expert_ids)
    assert second.expert_ids.shape == (3, 2)
    np.testing.assert_array_equal(y, jmoe.MoE(cfg).apply(variables, x)[0])


@pytest.mark.parametrize(
    "router",
    [jmoe.TopK(k=2), jmoe.NullExperts(num_null=2, k=2), jmoe.TopP(max_k=3)],
    ids=lambda r: r.kind,
)
def test_zero_tokens_give_an_empty_output_and_finite_stats(router):
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=4, router=router, num_shared=1)
    variables = jmoe.MoE(cfg).init(jax.random.key(0), jnp.ones((1, 3, D)))
    y, stats = jmoe.MoE(cfg).apply(variables, jnp.ones((1, 0, D)))
    assert y.shape == (1, 0, D)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in stats.values())
    assert float(stats["active_experts"]) == 0.0
