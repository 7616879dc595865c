"""jmoe.attention against the head-by-head NumPy reference of tests/model_reference.py: GQA,
qk-norm, biases, sinks, sliding windows, segments, the KV cache, and `jax.nn.dot_product_attention`
against the plain path (outputs and gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_reference import ref_attention, ref_rope, ref_visible

from jmoe.lm.attention import (
    Attention,
    attend,
    dot_product_attend,
    same_segment,
    segment_positions,
    visible_keys,
    write_cache,
)
from jmoe.lm.config import ModelConfig
from jmoe.lm.rope import rope

B, S, D = 2, 5, 16


def _module(cfg: ModelConfig, window=None) -> Attention:
    return Attention(
        cfg.n_heads,
        cfg.kv_heads,
        cfg.dim_per_head,
        cfg.rope_theta,
        cfg.qk_norm,
        cfg.qkv_bias,
        cfg.norm_eps,
        qk_norm_scope=cfg.qk_norm_scope,
        o_bias=cfg.o_bias,
        attention_sinks=cfg.attention_sinks,
        sliding_window=window,
        attention_impl=cfg.attention_impl,
    )


def _init(cfg: ModelConfig, seed=0):
    """Inputs and NumPy-filled params: kernels N(0, 0.25^2), nonzero biases and sinks, norm scales
    around 1 (so a missing or misplaced bias, sink or scale shows)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(S), (B, S))
    shapes = jax.eval_shape(_module(cfg).init, jax.random.key(0), x, positions)["params"]

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.3 * noise if "scale" in jax.tree_util.keystr(path) else 0.25 * noise

    return x, positions, jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(module, params, *args):
    return jax.tree.map(np.asarray, jax.jit(module.apply)({"params": params}, *args))


def test_rope_matches_complex_rotation():
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 8), np.float32)
    positions = np.array([np.arange(7), np.arange(7) * 3 + 11])  # rows at different positions
    out = np.asarray(rope(x, positions, 500.0))
    for b in range(2):
        for h in range(3):
            want = ref_rope(x[b, :, h], positions[b], 500.0)
            np.testing.assert_allclose(out[b, :, h], want, atol=1e-5)
    np.testing.assert_array_equal(rope(x, jnp.zeros_like(positions), 500.0), x)  # angle 0


def test_attend_matches_per_head_loop_with_gqa():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 6, 8), np.float32)  # H=6 query heads
    k = rng.standard_normal((2, 5, 2, 8), np.float32)  # G=2 kv heads, T=5 keys
    v = rng.standard_normal((2, 5, 2, 8), np.float32)
    mask = rng.random((2, 4, 5)) < 0.6
    mask[:, :, 0] = True
    out = np.asarray(attend(q, k, v, mask))
    for b in range(2):
        for h in range(6):
            g = h // 3
            scores = q[b, :, h] @ k[b, :, g].T / np.sqrt(8)
            scores = np.where(mask[b], scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[b, :, h], p @ v[b, :, g], atol=1e-5)


def test_attend_rejects_heads_not_divisible():
    q, k = jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="h=3.*g=2"):
        attend(q, k, k, jnp.ones((1, 2, 2), bool))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_heads=4, n_kv_heads=2),
        dict(n_heads=4, n_kv_heads=1, qk_norm=True),
        dict(n_heads=2, head_dim=6, qkv_bias=True, qk_norm=True),
        dict(n_heads=4, n_kv_heads=2, qk_norm=True, qk_norm_scope="projection"),
    ],
    ids=["gqa", "mqa_qk_norm", "head_dim_bias", "gqa_projection_qk_norm"],
)
def test_attention_matches_reference(overrides):
    cfg = ModelConfig(d_model=D, rope_theta=100.0, **overrides)
    x, positions, params = _init(cfg)
    names = set(params)
    assert ("q_norm" in names and "k_norm" in names) == cfg.qk_norm
    assert all(("bias" in params[n]) == cfg.qkv_bias for n in ("q", "k", "v"))
    assert "bias" not in params["o"]
    assert params["q"]["kernel"].shape == (D, cfg.n_heads, cfg.dim_per_head)
    assert params["k"]["kernel"].shape == (D, cfg.kv_heads, cfg.dim_per_head)
    out, cache = _apply(_module(cfg), params, x, positions)
    assert cache is None
    for b in range(B):
        want, _, _ = ref_attention(params, x[b], np.arange(S), cfg)
        np.testing.assert_allclose(out[b], want, atol=1e-4, rtol=1e-4)


def test_write_cache_per_row_positions_drops_out_of_range():
    cache = {"k": jnp.zeros((2, 4, 1, 2)), "v": jnp.zeros((2, 4, 1, 2))}
    new = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 2, 1, 2)
    positions = jnp.array([[0, 1], [3, 4]])  # row 1's second entry is past the cache
    out = write_cache(cache, positions, k=new, v=-new)
    want = np.zeros((2, 4, 1, 2))
    want[0, 0], want[0, 1], want[1, 3] = new[0, 0], new[0, 1], new[1, 0]
    np.testing.assert_array_equal(out["k"], want)
    np.testing.assert_array_equal(out["v"], -want)


@pytest.mark.parametrize(
    "overrides, window",
    [
        (dict(qk_norm=True), None),
        (dict(attention_sinks=True, o_bias=True), 2),
        (dict(attention_impl="dot_product"), 2),
    ],
    ids=["full", "sinks_window", "dot_product_window"],
)
def test_cached_attention_rows_at_different_positions(overrides, window):
    """Row 0 holds 3 earlier tokens, row 1 holds 1; a 2-token step must see exactly those (the
    last `window` of them on a sliding layer)."""
    cfg = ModelConfig(d_model=D, n_heads=4, n_kv_heads=2, rope_theta=100.0, **overrides)
    x, _, params = _init(cfg, seed=3)
    module = _module(cfg, window)
    m, g, a = 8, cfg.kv_heads, cfg.dim_per_head
    lengths = (3, 1)
    cache = {"k": jnp.zeros((B, m, g, a)), "v": jnp.zeros((B, m, g, a))}
    prompt = np.random.default_rng(4).standard_normal((B, 3, D), np.float32)
    prompt_pos = np.broadcast_to(np.arange(3), (B, 3))
    _, cache = _apply(module, params, prompt, prompt_pos, cache)
    # Row 1 continues at position 1: its stale prompt entries at 1, 2 get overwritten / masked.
    step_pos = np.array([[3, 4], [1, 2]])
    out, cache = _apply(module, params, x[:, :2], step_pos, cache)
    for b, n in enumerate(lengths):
        row = np.concatenate([prompt[b, :n], x[b, :2]])
        index = np.arange(n + 2)
        visible = ref_visible(index, index, window)
        want, keys, values = ref_attention(params, row, index, cfg, visible)
        np.testing.assert_allclose(out[b], want[n:], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(cache["k"][b, : n + 2], keys, atol=1e-5)
        np.testing.assert_allclose(cache["v"][b, : n + 2], values, atol=1e-5)


def test_bfloat16_compute_keeps_float32_scores():
    cfg = ModelConfig(d_model=D, n_heads=4, n_kv_heads=2)
    x, positions, params = _init(cfg)
    bf16 = dataclasses.replace(_module(cfg), dtype=jnp.bfloat16)
    out, _ = jax.jit(bf16.apply)({"params": params}, x, positions)
    ref32, _ = _apply(_module(cfg), params, x, positions)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref32, atol=0.1, rtol=0.05)


DOCS = np.array([[0, 0, 1, 1, 1], [3, 5, 5, 5, 6]])  # segment ids of the two rows


@pytest.mark.parametrize(
    "overrides, window, docs",
    [
        (dict(n_heads=4, n_kv_heads=2, attention_sinks=True, o_bias=True), 2, None),
        (dict(n_heads=4, n_kv_heads=1, attention_sinks=True, attention_impl="plain"), None, DOCS),
        (dict(n_heads=4, n_kv_heads=2, qkv_bias=True, o_bias=True), 2, DOCS),
        (dict(n_heads=2, attention_impl="plain"), 1, None),
    ],
    ids=["sinks_window_obias", "mqa_sinks_segments", "dot_product_window_segments", "window_1"],
)
def test_sinks_windows_segments_match_reference(overrides, window, docs):
    cfg = ModelConfig(d_model=D, rope_theta=100.0, **overrides)
    x, positions, params = _init(cfg, seed=5)
    assert ("sinks" in params) == cfg.attention_sinks
    if cfg.attention_sinks:
        assert params["sinks"].shape == (cfg.n_heads,)
    assert ("bias" in params["o"]) == cfg.o_bias
    if cfg.o_bias:
        assert params["o"]["bias"].shape == (D,)
    out, _ = _apply(_module(cfg, window), params, x, positions, None, docs)
    for b in range(B):
        row_docs = None if docs is None else docs[b]
        visible = ref_visible(np.arange(S), np.arange(S), window, row_docs, row_docs)
        want, _, _ = ref_attention(params, x[b], np.arange(S), cfg, visible)
        np.testing.assert_allclose(out[b], want, atol=1e-4, rtol=1e-4)


def test_sink_logit_limits():
    """A sink of -1e9 changes nothing; a sink far above every score takes all the mass."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 3, 4, 8), np.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    mask = np.tril(np.ones((3, 3), bool))[None]
    plain = attend(q, k, v, mask)
    np.testing.assert_allclose(attend(q, k, v, mask, jnp.full((4,), -1e9)), plain, atol=1e-6)
    np.testing.assert_allclose(attend(q, k, v, mask, jnp.full((4,), 1e4)), 0.0, atol=1e-6)


def test_masks_and_segment_positions_match_loops():
    positions = np.array([[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]])
    keys = np.broadcast_to(np.arange(10), (2, 10))
    for window in (None, 1, 3):
        got = np.asarray(visible_keys(positions, keys, window))
        for b in range(2):
            np.testing.assert_array_equal(got[b], ref_visible(positions[b], keys[b], window))
    ids = np.array([[7, 7, 2, 2, 2, 7], [0, 1, 2, 3, 3, 3]])
    want = np.array([[0, 1, 0, 1, 2, 0], [0, 0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(segment_positions(ids), want)
    np.testing.assert_array_equal(same_segment(ids)[0, 0], [1, 1, 0, 0, 0, 1])


@pytest.mark.parametrize(
    "h, g, window, with_docs",
    [(4, 2, None, False), (4, 1, 2, False), (4, 2, None, True), (2, 2, 3, True)],
)
def test_dot_product_attention_equals_plain(h, g, window, with_docs):
    """`jax.nn.dot_product_attention` (causal, window, segment mask) against `attend` with the
    same mask: outputs and the gradients of q, k and v."""
    rng = np.random.default_rng(h + g)
    q = rng.standard_normal((B, 6, h, 8), np.float32)
    k, v = (rng.standard_normal((B, 6, g, 8), np.float32) for _ in range(2))
    cotangent = rng.standard_normal((B, 6, h, 8), np.float32)
    docs = np.array([[0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 4, 4]]) if with_docs else None
    index = np.broadcast_to(np.arange(6), (B, 6))
    mask = np.asarray(visible_keys(index, index, window))
    if with_docs:
        mask &= np.asarray(same_segment(docs))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda *qkv: (fn(*qkv) * cotangent).sum(), (0, 1, 2)))

    value, grads = loss(lambda *qkv: dot_product_attend(*qkv, window, docs))(q, k, v)
    want_value, want_grads = loss(lambda *qkv: attend(*qkv, mask))(q, k, v)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_dot_product_refuses_sinks():
    cfg = ModelConfig(d_model=D, attention_sinks=True)
    with pytest.raises(ValueError, match="attention_impl.*sink"):
        dataclasses.replace(cfg, attention_impl="dot_product")
    x, positions, params = _init(cfg)
    module = dataclasses.replace(_module(cfg), attention_impl="dot_product")
    with pytest.raises(ValueError, match="cannot apply attention sinks"):
        module.apply({"params": params}, x, positions)
