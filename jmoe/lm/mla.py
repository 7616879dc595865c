"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a compressed-latent decode cache.

Axis letters beyond the package legend: `H` heads, `N` the non-rotated ("nope") query/key width,
`P` the rotated ("rope") width, `Q = N + P` the query/key head width, `W` the value head width,
`R` the key/value latent rank (`kv_lora_rank`), `L` the query latent rank (`q_lora_rank`), `M`
the cache length.

Per token: the query is `q = W_q x` (or `W_qb rms(W_qa x)`), split per head into `q_N` and the
rotated `q_P`; the latent `c = rms(W_kv_a x)[:R]` and one rotated key `k_P = rope(W_kv_a x)[R:]`
shared by every head; `W_kv_b c` gives per head the key part `k_N` and the value `v`. Head h
scores `(q_N . k_N + q_P . k_P) * scale` with `scale = Q**-0.5` (times YaRN's
`softmax_scale_factor`), and the heads' `softmax . v` meet in `W_o`.

Cached decoding keeps only `c` and `k_P` per position and never expands them: `q_N . (W_kb c)`
is `(W_kb^T q_N) . c`, and `sum_t p_t W_vb c_t` is `W_vb (sum_t p_t c_t)` (the "absorbed" form).
The full forward without a cache expands keys and values, which is cheaper for long prompts.

Parameters (input-first kernels): `q/kernel [D, H, Q]`, or `q_a/kernel [D, L]`,
`q_a_norm/scale [L]`, `q_b/kernel [L, H, Q]`; `kv_a/kernel [D, R + P]`, `kv_a_norm/scale [R]`,
`kv_b/kernel [R, H, N + W]`, `o/kernel [H, W, D]`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.lm.attention import same_segment, write_cache
from jmoe.lm.rope import YarnScaling, rope
from jmoe.validation import check as _check

MLACache = dict[str, jax.Array]  # {"latent": [B, M, R], "k_rope": [B, M, P]} for one layer


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Shapes of multi-head latent attention (HF DeepSeek-V2/V3 names).

    Attributes:
      kv_lora_rank: R, width of the cached key/value latent.
      qk_nope_head_dim: N, per-head query/key width without RoPE.
      qk_rope_head_dim: P, per-head query width with RoPE, and the width of the one rotated key
        shared by all heads (even).
      v_head_dim: W, per-head value width.
      q_lora_rank: L, width of the low-rank query latent; None projects queries directly.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    def __post_init__(self):
        owner = "MLAConfig"
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _check(name, value, isinstance(value, int) and value >= 1, "an integer >= 1", owner)
        p = self.qk_rope_head_dim
        _check(
            "qk_rope_head_dim",
            p,
            isinstance(p, int) and p >= 2 and p % 2 == 0,
            "an even integer >= 2 (RoPE rotates pairs)",
            owner,
        )
        q = self.q_lora_rank
        _check(
            "q_lora_rank",
            q,
            q is None or (isinstance(q, int) and q >= 1),
            "None (a direct query projection) or an integer >= 1",
            owner,
        )

    @property
    def qk_head_dim(self) -> int:
        """Q = N + P."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def weights(self, d_model: int, n_heads: int) -> int:
        """Matmul weights of one layer's projections (for FLOP counts)."""
        h, q = n_heads, self.qk_head_dim
        query = d_model * h * q
        if self.q_lora_rank is not None:
            query = self.q_lora_rank * (d_model + h * q)
        r, n, p, w = (
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        )
        return query + d_model * (r + p) + r * h * (n + w) + h * w * d_model


class _Kernel(nn.Module):
    """A bare kernel `[R, H, C]` (used expanded and absorbed, so not a Dense)."""

    shape: tuple[int, ...]
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        return self.param("kernel", init, self.shape, self.param_dtype)


def _softmax(scores_BxHxSxT: jax.Array, visible_BxSxT: jax.Array) -> jax.Array:
    """Float32 softmax over the visible keys (each query sees at least one)."""
    scores_BxHxSxT = jnp.where(visible_BxSxT[:, None], scores_BxHxSxT, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BxHxSxT, axis=-1)


def attend_expanded(
    q_nope_BxSxHxN, q_rope_BxSxHxP, latent_BxTxR, k_rope_BxTxP, kv_b_RxHxC, visible_BxSxT, scale
) -> jax.Array:
    """MLA with keys and values expanded from the latents: `[B, S, H, W]` in the latents' dtype.

    `kv_b_RxHxC` holds per head the key part (`C[:N]`) and the value part (`C[N:]`).
    """
    n = q_nope_BxSxHxN.shape[-1]
    kv_BxTxHxC = jnp.einsum("btr,rhc->bthc", latent_BxTxR, kv_b_RxHxC)
    k_nope_BxTxHxN, v_BxTxHxW = kv_BxTxHxC[..., :n], kv_BxTxHxC[..., n:]
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    scores_BxHxSxT = f32("bshn,bthn->bhst", q_nope_BxSxHxN, k_nope_BxTxHxN)
    scores_BxHxSxT += f32("bshp,btp->bhst", q_rope_BxSxHxP, k_rope_BxTxP)
    probs = _softmax(scores_BxHxSxT * scale, visible_BxSxT).astype(v_BxTxHxW.dtype)
    return jnp.einsum("bhst,bthw->bshw", probs, v_BxTxHxW)


def attend_absorbed(
    q_nope_BxSxHxN, q_rope_BxSxHxP, latent_BxTxR, k_rope_BxTxP, kv_b_RxHxC, visible_BxSxT, scale
) -> jax.Array:
    """`attend_expanded` computed on the latents themselves, never building a per-position key
    or value (the decode form: T cached positions, few queries)."""
    n = q_nope_BxSxHxN.shape[-1]
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    # 1. The key part of kv_b moves onto the query: q_N . (W_kb c) = (W_kb^T q_N) . c.
    q_latent_BxSxHxR = jnp.einsum("bshn,rhn->bshr", q_nope_BxSxHxN, kv_b_RxHxC[..., :n])
    scores_BxHxSxT = f32("bshr,btr->bhst", q_latent_BxSxHxR, latent_BxTxR)
    scores_BxHxSxT += f32("bshp,btp->bhst", q_rope_BxSxHxP, k_rope_BxTxP)
    probs = _softmax(scores_BxHxSxT * scale, visible_BxSxT).astype(latent_BxTxR.dtype)
    # 2. The value part applies after the weighted sum: sum_t p_t W_vb c_t = W_vb sum_t p_t c_t.
    context_BxSxHxR = jnp.einsum("bhst,btr->bshr", probs, latent_BxTxR)
    return jnp.einsum("bshr,rhw->bshw", context_BxSxHxR, kv_b_RxHxC[..., n:])


class MLA(nn.Module):
    """Multi-head latent attention with RoPE (see the module docstring).

    Attributes:
      config: the `MLAConfig`.
      num_heads: H.
      rope_theta: RoPE base.
      rope_scaling: optional YaRN scaling (frequencies, rotated-feature scale, softmax scale).
      norm_eps: epsilon of the latent RMSNorms (computed in float32).
      dtype, param_dtype: compute and parameter dtypes (scores and softmax are float32).
    """

    config: MLAConfig
    num_heads: int
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxSxD: jax.Array,
        positions_BxS: jax.Array,
        cache: MLACache | None = None,
        segment_ids_BxS: jax.Array | None = None,
    ) -> tuple[jax.Array, MLACache | None]:
        """Attention output `[B, S, D]` (in `dtype`) and the updated cache.

        Without a cache, token s attends to tokens 0..s of its own row (with `segment_ids_BxS`
        only to those with the same id; `positions_BxS` only rotates). With a cache
        (`{"latent": [B, M, R], "k_rope": [B, M, P]}`, see
        `jmoe.lm.model.init_cache`) the new latents and rotated keys are written at
        `positions_BxS` and a token at position p attends to cache entries 0..p in the absorbed
        form, so each row of a batch may be at a different position.
        """
        cfg, h = self.config, self.num_heads
        n, p, w, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dense = functools.partial(
            nn.DenseGeneral,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.lecun_normal(),
        )
        norm = functools.partial(
            nn.RMSNorm, self.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype
        )
        x_BxSxD = x_BxSxD.astype(self.dtype)
        if cfg.q_lora_rank is None:
            q_BxSxHxQ = dense((h, cfg.qk_head_dim), name="q")(x_BxSxD)
        else:
            q_BxSxL = norm(name="q_a_norm")(dense(cfg.q_lora_rank, name="q_a")(x_BxSxD))
            q_BxSxHxQ = dense((h, cfg.qk_head_dim), name="q_b")(q_BxSxL.astype(self.dtype))
        q_nope_BxSxHxN, q_rope_BxSxHxP = q_BxSxHxQ[..., :n], q_BxSxHxQ[..., n:]
        q_rope_BxSxHxP = rope(q_rope_BxSxHxP, positions_BxS, self.rope_theta, self.rope_scaling)
        kv_BxSxC = dense(r + p, name="kv_a")(x_BxSxD)
        latent_BxSxR = norm(name="kv_a_norm")(kv_BxSxC[..., :r]).astype(self.dtype)
        k_rope_BxSxP = rope(
            kv_BxSxC[..., None, r:], positions_BxS, self.rope_theta, self.rope_scaling
        )[:, :, 0]
        kv_b_RxHxC = _Kernel((r, h, n + w), self.param_dtype, name="kv_b")().astype(self.dtype)
        scale = cfg.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            scale *= self.rope_scaling.softmax_scale_factor
        if cache is None:
            s = x_BxSxD.shape[1]
            visible_BxSxT = jnp.tril(jnp.ones((s, s), bool))[None]
            if segment_ids_BxS is not None:
                visible_BxSxT &= same_segment(segment_ids_BxS)
            out_BxSxHxW = attend_expanded(
                q_nope_BxSxHxN, q_rope_BxSxHxP, latent_BxSxR, k_rope_BxSxP, kv_b_RxHxC,
                visible_BxSxT, scale,
            )  # fmt: skip
        else:
            if segment_ids_BxS is not None:
                raise ValueError("segment ids apply to the full forward only, not to cached decode")
            cache = write_cache(cache, positions_BxS, latent=latent_BxSxR, k_rope=k_rope_BxSxP)
            m = cache["latent"].shape[1]
            visible_BxSxM = jnp.arange(m)[None, None, :] <= positions_BxS[:, :, None]
            out_BxSxHxW = attend_absorbed(
                q_nope_BxSxHxN, q_rope_BxSxHxP, cache["latent"].astype(self.dtype),
                cache["k_rope"].astype(self.dtype), kv_b_RxHxC, visible_BxSxM, scale,
            )  # fmt: skip
        o = dense(x_BxSxD.shape[-1], axis=(-2, -1), name="o")
        return o(out_BxSxHxW), cache
