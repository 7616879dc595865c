"""Causal grouped-query self-attention with RoPE, optional qk-norm and qkv bias, and a KV cache.

Axis letters beyond the package legend: `H` query heads, `G` key/value heads (each shared by
`H / G` query heads), `A` per-head width, `M` KV-cache length.

Parameters of `Attention` (HF-like names, kernels laid out input-first): `q/kernel` `[D, H, A]`,
`k/kernel` and `v/kernel` `[D, G, A]` (plus `bias` `[H|G, A]` with `qkv_bias`), `o/kernel`
`[H, A, D]`, and with `qk_norm` the RMSNorm scales `q_norm/scale`, `k_norm/scale` (`[A]` per head,
`[H, A]` / `[G, A]` over the whole projection).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.lm.rope import YarnScaling, rope

KVCache = dict[str, jax.Array]  # {"k": [B, M, G, A], "v": [B, M, G, A]} for one layer


def attend(
    q_BxSxHxA: jax.Array, k_BxTxGxA: jax.Array, v_BxTxGxA: jax.Array, mask_BxSxT: jax.Array
) -> jax.Array:
    """Grouped-query softmax attention `softmax(q k^T / sqrt(A)) v` with float32 scores.

    Query head `h` reads key/value head `h // (H / G)`. Each query needs at least one visible key.

    Args:
      q_BxSxHxA: queries.
      k_BxTxGxA, v_BxTxGxA: keys and values of the T visible positions.
      mask_BxSxT: True where query s may attend to key t.

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
    probs = jax.nn.softmax(scores_BxGxRxSxT, axis=-1).astype(v_BxTxGxA.dtype)
    out_BxSxGxRxA = jnp.einsum("bgrst,btga->bsgra", probs, v_BxTxGxA)
    return out_BxSxGxRxA.reshape(b, s, h, a)


def write_cache(cache: KVCache, k_BxSxGxA, v_BxSxGxA, positions_BxS) -> KVCache:
    """The cache with each row's new keys and values stored at that row's positions.

    Positions outside `[0, M)` are dropped.
    """
    rows_Bx1 = jnp.arange(positions_BxS.shape[0])[:, None]
    return {
        name: cache[name]
        .at[rows_Bx1, positions_BxS]
        .set(new.astype(cache[name].dtype), mode="drop")
        for name, new in (("k", k_BxSxGxA), ("v", v_BxSxGxA))
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
    rope_scaling: YarnScaling | None = None

    @nn.compact
    def __call__(
        self, x_BxSxD: jax.Array, positions_BxS: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention output `[B, S, D]` (in `dtype`) and the updated cache.

        Without a cache, token s attends to tokens 0..s of its own row (`positions_BxS` only
        rotates). With a cache (`[B, M, G, A]` arrays, see `jmoe.lm.model.init_cache`) the new keys
        and values are written at `positions_BxS` and a token at position p attends to cache
        entries 0..p, so each row of a batch may be at a different position.
        """
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
        if cache is None:
            s = x_BxSxD.shape[1]
            mask_BxSxT = jnp.tril(jnp.ones((s, s), bool))[None]
            out = attend(q, k, v, mask_BxSxT)
        else:
            cache = write_cache(cache, k, v, positions_BxS)
            m = cache["k"].shape[1]
            mask_BxSxM = jnp.arange(m)[None, None, :] <= positions_BxS[:, :, None]
            out = attend(
                q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), mask_BxSxM
            )
        o = dense(x_BxSxD.shape[-1], axis=(-2, -1), use_bias=False, name="o")
        return o(out), cache
