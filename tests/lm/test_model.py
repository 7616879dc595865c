"""jmoe.model against the NumPy reference of tests/model_reference.py and against itself
(scan vs unrolled, remat vs none, decode vs forward)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from decode_check import assert_decode_matches_forward
from model_reference import ref_transformer

import jmoe
from jmoe.lm.config import ModelConfig
from jmoe.lm.flops import flops_per_token
from jmoe.lm.model import Transformer, init_cache, update_moe_state
from jmoe.lm.param_layout import LayerKind, layer_segments, stack_layers, unstack_layers
from jmoe.moe.config import MoEConfig

B, S, V = 2, 6, 32


def _config(**overrides) -> ModelConfig:
    moe = MoEConfig(**{"d_ff": 8, "num_experts": 4, **overrides.pop("moe", {})})
    base = dict(
        vocab_size=V, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=16
    )
    return ModelConfig(**{**base, **overrides, "moe": moe})


def _tokens(seed=0, shape=(B, S)):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _init(cfg: ModelConfig, seed=0, bias_scale=0.0):
    """Random variables of the unrolled model from NumPy (no init compile): kernels and
    embeddings N(0, 0.25^2), norm scales around 1, and a `bias_scale` selection bias."""
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens())
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "moe_state" in name:
            return bias_scale * noise
        return 1.0 + 0.1 * noise if "scale" in name else 0.25 * noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(cfg, variables, tokens, **kwargs):
    fn = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, **kwargs))
    return jax.tree.map(np.asarray, fn(variables, tokens))


@pytest.mark.parametrize(
    "n_layers, first_dense, every, want",
    [
        (3, 0, 1, "MMM"),
        (6, 1, 2, "DMDMDM"),
        (5, 2, 2, "DDMDM"),
        (4, 0, 3, "MDDM"),
        (3, 0, 0, "DDD"),
        (2, 4, 1, "DD"),
    ],
)
def test_moe_layer_placement(n_layers, first_dense, every, want):
    cfg = _config(n_layers=n_layers, first_dense_layers=first_dense, moe_every=every)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens())
    got = "".join("M" if "moe" in shapes["params"][f"layers_{i}"] else "D" for i in range(n_layers))
    assert got == want
    for i, kind in enumerate(want):
        layer = shapes["params"][f"layers_{i}"]
        assert ("mlp" in layer) == (kind == "D")
    # The scanned layout covers the same layers with the same shapes.
    scan_model = Transformer(dataclasses.replace(cfg, scan_layers=True))
    unstacked = jax.eval_shape(
        lambda key: unstack_layers(cfg, scan_model.init(key, _tokens())["params"]),
        jax.random.key(0),
    )
    assert jax.tree.map(lambda a: a.shape, unstacked) == (
        jax.tree.map(lambda a: a.shape, shapes["params"])
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=False, qk_norm=True, qkv_bias=True, first_dense_layers=1),
    ],
    ids=["tied", "untied_qknorm_bias_dense_first"],
)
def test_forward_matches_reference(overrides):
    cfg = _config(**overrides)
    variables = _init(cfg, bias_scale=0.05)
    params = variables["params"]
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert set(params["layers_1"]["moe"]) == {"router", "experts"}  # exactly jmoe.MoE's tree
    tokens = _tokens(1)
    logits, _ = _apply(cfg, variables, tokens)
    assert logits.dtype == np.float32 and logits.shape == (B, S, V)
    np.testing.assert_allclose(logits, ref_transformer(variables, tokens, cfg), atol=2e-4)


def test_stats_aggregate_the_moe_layers():
    """Per-layer rows equal `jmoe.MoE` run alone on that layer's input; scalars aggregate them."""
    cfg = _config(n_layers=2, moe=dict(z_loss_coef=0.1, lb_coef=0.02))
    variables = _init(cfg, bias_scale=0.05)
    tokens = _tokens(2)
    mask = np.ones((B, S), bool)
    mask[1, 4:] = False
    fn = lambda v, t: Transformer(cfg).apply(  # noqa: E731
        v, t, token_mask_BxS=mask, capture_intermediates=True, mutable=["intermediates"]
    )
    (_, stats), inter = jax.jit(fn)(variables, tokens)
    layer_stats = []
    moe_apply = jax.jit(lambda v, x: jmoe.MoE(cfg.moe).apply(v, x, token_mask=mask)[1])
    for i in (0, 1):
        h = inter["intermediates"][f"layers_{i}"]["ffn_norm"]["__call__"][0]
        layer_vars = {
            "params": variables["params"][f"layers_{i}"]["moe"],
            "moe_state": variables["moe_state"][f"layers_{i}"]["moe"],
        }
        layer_stats.append(moe_apply(layer_vars, h))
    stack = lambda key: np.stack([s[key] for s in layer_stats])  # noqa: E731
    np.testing.assert_allclose(stats["tokens_per_expert"], stack("tokens_per_expert"), atol=1e-5)
    np.testing.assert_allclose(stats["tokens_per_expert"].sum(-1), [2 * mask.sum()] * 2)
    for key, want in [
        ("active_experts", stack("active_experts")),
        ("dropped_fraction", stack("dropped_fraction")),
        ("router_entropy", stack("entropy")),
        ("aux_loss", stack("aux_loss").sum()),
        ("load_balance_loss", stack("load_balance_loss").mean()),
        ("z_loss", stack("z_loss").mean()),
        ("entropy", stack("entropy").mean()),
        ("expert_flops_per_token", stack("expert_flops_per_token").sum()),
    ]:
        np.testing.assert_allclose(stats[key], want, rtol=1e-5, err_msg=key)
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(stats))


@pytest.mark.parametrize("residual", ["prenorm", "coe"])
def test_chain_of_experts_residual(residual):
    """ "prenorm" adds the MoE output to the stream; "coe" (x_C = norm(h) + sum of the steps)
    replaces it."""
    moe = dict(chain_steps=2, chain_residual=residual, router=jmoe.TopK(k=1))
    cfg = _config(n_layers=1, moe=moe)
    variables = _init(cfg)
    fn = lambda v, t: Transformer(cfg).apply(  # noqa: E731
        v, t, capture_intermediates=True, mutable=["intermediates"]
    )
    _, inter = jax.jit(fn)(variables, _tokens(11))
    layer = inter["intermediates"]["layers_0"]
    out, (stats, _) = layer["__call__"][0]
    y = layer["moe"]["__call__"][0][0]
    assert stats["tokens_per_expert"].shape == (2, 4)  # [C, E]
    if residual == "coe":
        np.testing.assert_array_equal(out, y)
    else:
        x = variables["params"]["embed"]["embedding"][_tokens(11)]
        attn = layer["attn"]["__call__"][0][0]
        np.testing.assert_allclose(out, x + attn + y, atol=1e-5)


def test_sequence_longer_than_max_seq_len_is_refused():
    cfg = _config(max_seq_len=4)
    with pytest.raises(ValueError, match="sequence length 6 > max_seq_len=4"):
        jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens())


def test_dense_model_has_empty_moe_stats():
    cfg = _config(moe_every=0)
    variables = _init(cfg)
    assert "moe_state" not in variables or not variables["moe_state"]
    _, stats = _apply(cfg, variables, _tokens())
    assert stats["tokens_per_expert"].shape == (0, 4)
    assert stats["aux_loss"] == 0 and stats["load_balance_loss"] == 0
    assert update_moe_state(cfg, {}, stats) == {}


def _grads(cfg, variables, tokens):
    """`((loss, (logits, stats)), grads)` of a loss that reaches every parameter."""

    def loss(params):
        logits, stats = Transformer(cfg).apply({**variables, "params": params}, tokens)
        return jax.nn.log_softmax(logits)[..., 0].mean() + stats["aux_loss"], (logits, stats)

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return jax.tree.map(np.asarray, fn(variables["params"]))


def _moe_state_rows(cfg, moe_state):
    return [moe_state[f"layers_{i}"]["moe"] for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def test_scan_with_remat_matches_unrolled():
    """Same params restacked (scan + "dots" remat): equal logits, stats, gradients, updates."""
    cfg = _config(
        n_layers=5,
        first_dense_layers=1,
        moe_every=2,
        moe=dict(router=jmoe.TopK(bias_update_rate=0.1)),
    )
    variables = _init(cfg, bias_scale=0.05)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat="dots")
    dense, moe = LayerKind(moe=False), LayerKind(moe=True)
    assert layer_segments(cfg) == [(0, 1, (dense,)), (1, 2, (moe, dense))]
    scanned = {k: stack_layers(cfg, v) for k, v in variables.items()}
    assert set(scanned["params"]) == {"embed", "final_norm", "stacks_0", "stacks_1"}
    assert scanned["params"]["stacks_1"]["block_0"]["moe"]["router"]["kernel"].shape == (2, 16, 4)
    jax.tree.map(
        np.testing.assert_array_equal, unstack_layers(cfg, scanned["params"]), variables["params"]
    )
    tokens = _tokens(3)
    (value, (logits, stats)), grads = _grads(cfg, variables, tokens)
    (scan_value, (scan_logits, scan_stats)), scan_grads = _grads(scan_cfg, scanned, tokens)
    np.testing.assert_allclose(scan_value, value, rtol=1e-6)
    np.testing.assert_allclose(scan_logits, logits, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), scan_stats, stats)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        unstack_layers(cfg, scan_grads),
        grads,
    )
    # Each layer's bias moves by its own loads, and lands on the same layers in both layouts.
    new = jax.jit(functools.partial(update_moe_state, cfg))(variables["moe_state"], stats)
    scan_update = jax.jit(functools.partial(update_moe_state, scan_cfg))
    scan_new = scan_update(scanned["moe_state"], scan_stats)
    jax.tree.map(np.testing.assert_allclose, unstack_layers(cfg, scan_new), new)
    rows = zip(_moe_state_rows(cfg, variables["moe_state"]), _moe_state_rows(cfg, new))
    for row, (old, upd) in enumerate(rows):
        load = stats["tokens_per_expert"][row]
        np.testing.assert_allclose(upd["bias"], old["bias"] + 0.1 * np.sign(load.mean() - load))


def test_full_remat_gives_identical_grads():
    cfg = _config(n_layers=1, qk_norm=True)
    variables = _init(cfg)
    tokens = _tokens(4)
    _, grads = _grads(cfg, variables, tokens)
    _, remat_grads = _grads(dataclasses.replace(cfg, remat="full"), variables, tokens)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, grads)


GPT_OSS_ATTENTION = dict(attention_sinks=True, o_bias=True, qkv_bias=True, sliding_window=2)


@pytest.mark.parametrize(
    "scan, n_layers, gpt_oss",
    [(False, 2, False), (True, 3, False), (False, 3, True), (True, 4, True)],
    ids=["unrolled", "scan", "unrolled_sinks_sliding", "scan_sinks_sliding"],
)
def test_decode_matches_forward_rows_at_different_positions(scan, n_layers, gpt_oss):
    """Prefill (right-padded prompts of lengths 2 and 4), then token-by-token decoding with each
    row at its own position, equals the full forward of each row (also with sinks and sliding
    layers of window 2 alternating with full ones)."""
    features = {}
    if gpt_oss:
        types = ("sliding_attention", "full_attention") * n_layers
        features = dict(GPT_OSS_ATTENTION, layer_types=types[:n_layers])
    cfg = _config(n_layers=n_layers, first_dense_layers=1, qk_norm=True, **features)
    variables = _init(cfg, bias_scale=0.05)
    tokens = _tokens(5, (B, 8))
    full_logits = ref_transformer(variables, tokens, cfg)
    if scan:
        variables = {k: stack_layers(cfg, v) for k, v in variables.items()}
        cfg = dataclasses.replace(cfg, scan_layers=True)
    cache = init_cache(cfg, B, 12)
    assert cache["k"].shape == (n_layers, B, 12, cfg.kv_heads, cfg.dim_per_head)
    assert_decode_matches_forward(cfg, variables, tokens, np.asarray(full_logits), cache)


def test_update_moe_state_budget_controller():
    moe = dict(router=jmoe.NullExperts(num_null=2, k=2, target_active_experts=1.0, budget_rate=0.5))
    cfg = _config(n_layers=1, moe=moe)
    variables = _init(cfg)
    _, stats = _apply(cfg, variables, _tokens(7))
    new = update_moe_state(cfg, variables["moe_state"], stats)
    for row, upd in enumerate(_moe_state_rows(cfg, new)):
        np.testing.assert_allclose(upd["budget"], 0.5 * (stats["active_experts"][row] - 1.0))


def test_flops_per_token_hand_count():
    cfg = _config(
        n_layers=3,
        first_dense_layers=1,
        n_heads=4,
        n_kv_heads=2,
        moe=dict(num_shared=1, shared_gate=True),
    )
    d, a, s = 16, 4, 10
    attention_weights = d * 4 * a + 2 * d * 2 * a + 4 * a * d  # q, k + v, o
    dense_ffn = 3 * d * 24
    router, expert, shared = d * 4, 3 * d * 8, 3 * d * 8 + d  # shared MLP + its gate
    lm_head = d * V

    def count(active):
        moe = sum(router + expert * k + shared for k in active)
        weights = 3 * attention_weights + dense_ffn + moe + lm_head
        return 6 * weights + 12 * 3 * 4 * a * s

    assert flops_per_token(cfg, s) == count([2, 2])
    assert flops_per_token(cfg, s, active_experts=np.array([1.5, 0.5])) == count([1.5, 0.5])
    assert flops_per_token(cfg, s, active_experts=1.0) == count([1.0, 1.0])


def test_bfloat16_compute():
    cfg = _config(n_layers=1)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    variables = _init(cfg)
    tokens = _tokens(8)
    ref_logits, _ = _apply(cfg, variables, tokens)
    (_, (logits, stats)), grads = _grads(bf16, variables, tokens)
    assert logits.dtype == np.float32 and stats["aux_loss"].dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits, atol=0.15)
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_router_jitter_only_in_training():
    cfg = _config(n_layers=1, moe=dict(router_jitter=0.5))
    variables = _init(cfg)
    tokens = _tokens(9)
    eval_logits, _ = _apply(cfg, variables, tokens)
    fn = jax.jit(
        lambda v, t, k: Transformer(cfg).apply(v, t, deterministic=False, rngs={"jitter": k})
    )
    train_logits, _ = fn(variables, tokens, jax.random.key(1))
    assert np.abs(np.asarray(train_logits) - eval_logits).max() > 0
    again, _ = fn(variables, tokens, jax.random.key(1))
    np.testing.assert_array_equal(again, train_logits)


def test_shifting_all_positions_leaves_logits_alone():
    """RoPE is relative: a constant shift of every position leaves attention unchanged."""
    cfg = _config(n_layers=1)
    variables = _init(cfg)
    tokens = _tokens(10)
    fn = jax.jit(lambda v, t, p: Transformer(cfg).apply(v, t, positions_BxS=p)[0])
    logits = np.asarray(fn(variables, tokens, np.broadcast_to(np.arange(S), (B, S))))
    shifted = np.asarray(fn(variables, tokens, np.arange(S)[None] + np.array([[7], [100]])))
    np.testing.assert_allclose(shifted, logits, atol=1e-4)
