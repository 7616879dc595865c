"""Causal grouped-query self-attention with RoPE, optional qk-norm, qkv / output biases,
attention sinks, a sliding window, document (segment) masks and a KV cache.

Axis letters beyond the package legend: `H` query heads, `G` key/value heads (each shared by
`H / G` query heads), `A` per-head width, `M` KV-cache length.

Parameters of `Attention` (HF-like names, kernels laid out input-first): `q/kernel` `[D, H, A]`,
`k/kernel` and `v/kernel` `[D, G, A]` (plus `bias` `[H|G, A]` with `qkv_bias`), `o/kernel`
`[H, A, D]` (plus `o/bias` `[D]` with `o_bias`), `sinks` `[H]` with `attention_sinks`, and with
`qk_norm` the RMSNorm scales `q_norm/scale`, `k_norm/scale` (`[A]` per head, `[H, A]` / `[G, A]`
over the whole projection).

What a query sees: keys at or before it (causal), within the last `sliding_window` positions on a
sliding layer (position p sees p-W+1..p), and of its own segment when segment ids are given. A
sink logit `s_h` joins head h's softmax as one more logit with no value, so the weights over the
keys sum to `1 - softmax weight of the sink` (GPT-OSS).

Two implementations compute the same thing: `attend` (scores in float32, a boolean mask, sinks)
and `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs in 16-bit dtypes, XLA
elsewhere). `attention_impl="auto"` takes the latter for the full forward without sinks and
`attend` for sinks and cached decode; "plain" and "dot_product" force one.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.lm.rope import YarnScaling, rope

KVCache = dict[str, jax.Array]  # {"k": [B, M, G, A], "v": [B, M, G, A]} for one layer


def attend(
    q_BxSxHxA: jax.Array,
    k_BxTxGxA: jax.Array,
    v_BxTxGxA: jax.Array,
    mask_BxSxT: jax.Array,
    sinks_H: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query softmax attention `softmax(q k^T / sqrt(A)) v` with float32 scores.

    Query head `h` reads key/value head `h // (H / G)`. Each query needs at least one visible key.

    Args:
      q_BxSxHxA: queries.
      k_BxTxGxA, v_BxTxGxA: keys and values of the T visible positions.
      mask_BxSxT: True where query s may attend to key t (batch axis 1 broadcasts).
      sinks_H: optional sink logit per query head, one more softmax entry with no value.

    Returns:
      `[B, S, H, A]` in the dtype of `v`.
    """
    b, s, h, a = q_BxSxHxA.shape
    g = k_BxTxGxA.shape[2]
    if h % g:
        raise ValueError(f"query heads {h=} are not a multiple of key/value heads {g=}")
    q_BxSxGxRxA = q_BxSxHxA.reshape(b, s, g, h // g, a)
    scores_BxGxRxSxT = jnp.einsum(
        "bsgra,btga->bgrst", q_BxSxGxRxA, k_BxTxGxA, preferred_element_type=jnp.float32
    ) * (a**-0.5)
    visible = mask_BxSxT[:, None, None, :, :]
    scores_BxGxRxSxT = jnp.where(visible, scores_BxGxRxSxT, jnp.finfo(jnp.float32).min)
    if sinks_H is None:
        probs = jax.nn.softmax(scores_BxGxRxSxT, axis=-1)
    else:
        # 1. Head h = g * R + r, so the [H] sinks reshape to [G, R]; the sink is logit T + 1 of
        #    every query's softmax and its probability is dropped (it has no value).
        sink_1xGxRx1x1 = sinks_H.astype(jnp.float32).reshape(1, g, h // g, 1, 1)
        sink_BxGxRxSx1 = jnp.broadcast_to(sink_1xGxRx1x1, (*scores_BxGxRxSxT.shape[:-1], 1))
        logits = jnp.concatenate([scores_BxGxRxSxT, sink_BxGxRxSx1], axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)[..., :-1]
    out_BxSxGxRxA = jnp.einsum("bgrst,btga->bsgra", probs.astype(v_BxTxGxA.dtype), v_BxTxGxA)
    return out_BxSxGxRxA.reshape(b, s, h, a)


def visible_keys(
    query_pos_BxS: jax.Array, key_pos_BxT: jax.Array, window: int | None = None
) -> jax.Array:
    """`[B, S, T]` bool: key t is at or before query s and, with a window W, after `s - W`."""
    q_BxSx1, k_Bx1xT = query_pos_BxS[:, :, None], key_pos_BxT[:, None, :]
    visible_BxSxT = k_Bx1xT <= q_BxSx1
    if window is not None:
        visible_BxSxT &= k_Bx1xT > q_BxSx1 - window
    return visible_BxSxT


def same_segment(segment_ids_BxS: jax.Array) -> jax.Array:
    """`[B, S, S]` bool: tokens s and t carry the same segment (document) id."""
    return segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]


def segment_positions(segment_ids_BxS: jax.Array) -> jax.Array:
    """Each token's offset from the start of its run of equal segment ids (int32 `[B, S]`).

    A run starts at index 0 and wherever the id differs from the previous token's.
    """
    s = segment_ids_BxS.shape[1]
    index_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids_BxS.shape)
    starts_BxS = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BxS[:, :1], bool),
            segment_ids_BxS[:, 1:] != segment_ids_BxS[:, :-1],
        ],
        axis=1,
    )
    # 1. The latest run start at or before s: the running maximum of the start indices.
    run_start_BxS = jax.lax.cummax(jnp.where(starts_BxS, index_BxS, 0), axis=1)
    return index_BxS - run_start_BxS


def dot_product_attend(
    q_BxSxHxA: jax.Array,
    k_BxSxGxA: jax.Array,
    v_BxSxGxA: jax.Array,
    window: int | None = None,
    segment_ids_BxS: jax.Array | None = None,
) -> jax.Array:
    """Causal self-attention (optionally windowed and within segments) by
    `jax.nn.dot_product_attention`; the same result as `attend` with the equivalent mask.

    Runs cuDNN flash attention where `cudnn_fits` says so, XLA's implementation elsewhere.
    """
    mask_Bx1xSxS = None if segment_ids_BxS is None else same_segment(segment_ids_BxS)[:, None]
    implementation = "cudnn" if cudnn_fits(q_BxSxHxA.dtype, q_BxSxHxA.shape[-1]) else "xla"
    return jax.nn.dot_product_attention(
        q_BxSxHxA,
        k_BxSxGxA,
        v_BxSxGxA,
        mask=mask_Bx1xSxS,
        is_causal=True,
        # 2. jax's (left, right) window counts the keys besides the query itself: W - 1, 0.
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )


def cudnn_fits(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention takes these inputs: a GPU backend, a 16-bit dtype and a
    head width that is a multiple of 8 up to 128."""
    return (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def write_cache(cache: dict[str, jax.Array], positions_BxS, **new_BxSx) -> dict[str, jax.Array]:
    """The cache with each row's new entries (`name=[B, S, ...]` per cache array `[B, M, ...]`,
    e.g. `k=..., v=...`) stored at that row's positions.

    Positions outside `[0, M)` are dropped.
    """
    rows_Bx1 = jnp.arange(positions_BxS.shape[0])[:, None]
    return {
        name: c.at[rows_Bx1, positions_BxS].set(new_BxSx[name].astype(c.dtype), mode="drop")
        for name, c in cache.items()
    }


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE.

    Attributes:
      num_heads, num_kv_heads, head_dim: H, G and A.
      rope_theta: RoPE base.
      rope_scaling: optional YaRN scaling of the RoPE (`jmoe.lm.rope.YarnScaling`).
      qk_norm: RMSNorm on queries and keys (before RoPE).
      qk_norm_scope: "head" (each head, Qwen3) or "projection" (all heads of q and of k
        together, OLMoE).
      qkv_bias: biases on the q/k/v projections, as in Qwen2.
      norm_eps: epsilon of the qk-norm.
      dtype, param_dtype: compute and parameter dtypes (scores and softmax are float32).
      o_bias: bias on the output projection (GPT-OSS).
      attention_sinks: a learned sink logit per query head, `sinks` `[H]` (GPT-OSS).
      sliding_window: W, or None for full attention (see the module docstring).
      attention_impl: "auto", "plain" or "dot_product" (see the module docstring).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    qk_norm: bool = False
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    qk_norm_scope: str = "head"
    o_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    attention_impl: str = "auto"
    rope_scaling: YarnScaling | None = None

    @nn.compact
    def __call__(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        cache: KVCache | None = None,
        segment_ids_BxS: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention output `[B, S, D]` (in `dtype`) and the updated cache.

        Without a cache, token s attends to the tokens t <= s of its own row (within the window,
        and with `segment_ids_BxS` only to those with the same id); `positions_BxS` only
        rotates. With a cache (`[B, M, G, A]` arrays, see `jmoe.lm.model.init_cache`) the new
        keys and values are written at `positions_BxS` and a token at position p attends to the
        cache entries 0..p (p-W+1..p on a sliding layer), so each row of a batch may be at a
        different position.
        """
        if cache is not None and segment_ids_BxS is not None:
            raise ValueError("segment ids apply to the full forward only, not to cached decode")
        if self.attention_sinks and self.attention_impl == "dot_product":
            raise ValueError(
                "attention_impl='dot_product' cannot apply attention sinks "
                "(jax.nn.dot_product_attention has no sink logits): use 'auto' or 'plain'"
            )
        dense = functools.partial(
            nn.DenseGeneral,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.lecun_normal(),
        )
        h, g, a = self.num_heads, self.num_kv_heads, self.head_dim
        x_BxSxD = x_BxSxD.astype(self.dtype)
        q = dense((h, a), use_bias=self.qkv_bias, name="q")(x_BxSxD)
        k = dense((g, a), use_bias=self.qkv_bias, name="k")(x_BxSxD)
        v = dense((g, a), use_bias=self.qkv_bias, name="v")(x_BxSxD)
        if self.qk_norm:
            axes = (-2, -1) if self.qk_norm_scope == "projection" else -1
            norm = functools.partial(
                nn.RMSNorm,
                self.norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                reduction_axes=axes,
                feature_axes=axes,
            )
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        q = rope(q, positions_BxS, self.rope_theta, self.rope_scaling)
        k = rope(k, positions_BxS, self.rope_theta, self.rope_scaling)
        sinks_H = None
        if self.attention_sinks:
            sinks_H = self.param("sinks", nn.initializers.zeros_init(), (h,), self.param_dtype)
        if cache is None:
            out = self._self_attend(q, k, v, sinks_H, segment_ids_BxS)
        else:
            cache = write_cache(cache, positions_BxS, k=k, v=v)
            keys, values = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
            key_pos_BxM = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
            mask_BxSxM = visible_keys(positions_BxS, key_pos_BxM, self.sliding_window)
            if self.attention_impl == "dot_product":
                out = jax.nn.dot_product_attention(
                    q, keys, values, mask=mask_BxSxM[:, None], implementation="xla"
                )
            else:
                out = attend(q, keys, values, mask_BxSxM, sinks_H)
        o = dense(x_BxSxD.shape[-1], axis=(-2, -1), use_bias=self.o_bias, name="o")
        return o(out), cache

    def _self_attend(self, q, k, v, sinks_H, segment_ids_BxS):
        """The full forward's attention, by the implementation `attention_impl` picks."""
        if self.attention_impl == "dot_product" or (
            self.attention_impl == "auto" and sinks_H is None
        ):
            return dot_product_attend(q, k, v, self.sliding_window, segment_ids_BxS)
        b, s = q.shape[:2]
        index_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask_BxSxS = visible_keys(index_BxS, index_BxS, self.sliding_window)
        if segment_ids_BxS is not None:
            mask_BxSxS &= same_segment(segment_ids_BxS)
        return attend(q, k, v, mask_BxSxS, sinks_H)
