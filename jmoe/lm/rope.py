"""Rotary position embedding (RoPE), its YaRN context extension, and the interleaved layout.

RoPE here is in the HF "rotate half" layout: feature `i < A/2` of a head is paired with feature
`i + A/2`. Checkpoints that pair neighbours `(2i, 2i + 1)` instead (the "interleaved" layout)
are turned into it by permuting the projection's output features once
(`interleaved_to_half_permutation`).

YaRN (`YarnScaling`, the HF `rope_scaling` dict with `rope_type: yarn`) changes two things: the
inverse frequencies (`inverse_frequencies`) and a scale on the rotated features
(`YarnScaling.attention_factor_value`, multiplied into cos and sin as HF does). Multi-head latent
attention also scales its softmax by `YarnScaling.softmax_scale_factor` (DeepSeek-V2/V3).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.validation import check as _check


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 when `factor <= 1`)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling, with the meaning of the HF `rope_scaling` fields (`rope_type: yarn`).

    Attributes:
      factor: context extension factor s; the interpolated frequencies are the base ones / s.
        (HF recomputes it as `max_position_embeddings / original_max_position_embeddings` for
        some checkpoints; this is the value actually applied.)
      original_max_position_embeddings: the pretraining context L; the correction range is
        found from it.
      beta_fast, beta_slow: rotation counts over L that bound the ramp: dimensions rotating more
        than `beta_fast` times keep their frequency, fewer than `beta_slow` times are
        interpolated.
      mscale, mscale_all_dim: DeepSeek's magnitude corrections. With both nonzero the rotated
        features are scaled by `yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)`,
        otherwise by `yarn_mscale(s)`; multi-head latent attention also multiplies its softmax
        scale by `yarn_mscale(s, mscale_all_dim) ** 2` when `mscale_all_dim` is nonzero.
      truncate: round the correction range outwards to whole dimensions (HF's default; GPT-OSS
        turns it off).
      attention_factor: overrides the scale on the rotated features (HF `attention_factor`).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        owner = "YarnScaling"
        _check("factor", self.factor, self.factor > 0, "a number > 0", owner)
        _check(
            "original_max_position_embeddings",
            self.original_max_position_embeddings,
            self.original_max_position_embeddings >= 1,
            "an integer >= 1 (the pretraining context length)",
            owner,
        )
        _check("beta_slow", self.beta_slow, self.beta_slow > 0, "a number > 0", owner)
        _check(
            "beta_fast",
            self.beta_fast,
            self.beta_fast >= self.beta_slow,
            f"a number >= beta_slow={self.beta_slow}",
            owner,
        )
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            _check(name, value, value >= 0, "a number >= 0", owner)
        _check(
            "attention_factor",
            self.attention_factor,
            self.attention_factor is None or self.attention_factor > 0,
            "None or a number > 0",
            owner,
        )

    @property
    def attention_factor_value(self) -> float:
        """The scale on cos and sin (so q.k of the rotated parts scales by its square)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_mscale(self.factor)

    @property
    def softmax_scale_factor(self) -> float:
        """The extra softmax scale of multi-head latent attention (1 without `mscale_all_dim`)."""
        if not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def correction_range(self, dim: int, theta: float) -> tuple[float, float]:
        """The frequency indices `(low, high)` between which the ramp runs, for head width `dim`.

        Index i rotates `L / (2 pi theta**(2i/dim))` times over L positions; solving for the index
        that rotates `beta` times gives `dim * ln(L / (2 pi beta)) / (2 ln theta)`.
        """

        def index(rotations: float) -> float:
            length = self.original_max_position_embeddings
            return dim * math.log(length / (2 * math.pi * rotations)) / (2 * math.log(theta))

        low, high = index(self.beta_fast), index(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)


def inverse_frequencies(dim: int, theta: float, scaling: YarnScaling | None = None) -> jax.Array:
    """The `[dim/2]` float32 rotation speeds `theta**(-2i/dim)`, YaRN-blended when `scaling`.

    With YaRN, index i gets `(1 - r_i) * f_i / s + r_i * f_i` where the extrapolation weight
    `r_i = 1 - clip((i - low) / (high - low), 0, 1)` runs from 1 (fast dims, kept) to 0 (slow
    dims, interpolated) between the correction range's bounds.
    """
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if scaling is None:
        return inv_freq
    low, high = scaling.correction_range(dim, theta)
    if high == low:
        high = low + 1e-3  # 1. a step instead of a ramp, without dividing by zero
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return inv_freq / scaling.factor * (1.0 - extrapolation) + inv_freq * extrapolation


def rope(
    x_BxSxHxA: jax.Array,
    positions_BxS: jax.Array,
    theta: float,
    scaling: YarnScaling | None = None,
) -> jax.Array:
    """Rotary position embedding, HF "rotate half" layout, computed in float32.

    Feature `i < A/2` is paired with feature `i + A/2` and the pair is rotated by the angle
    `position * inverse_frequencies(A, theta, scaling)[i]`.

    Args:
      x_BxSxHxA: queries or keys.
      positions_BxS: absolute position of each token (int).
      theta: RoPE base.
      scaling: optional YaRN scaling (frequencies, and cos / sin times its attention factor).

    Returns:
      The rotated `x`, in its dtype.
    """
    a = x_BxSxHxA.shape[-1]
    inv_freq = inverse_frequencies(a, theta, scaling)
    angle_BxSx1xA = (positions_BxS.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
    cos, sin = jnp.cos(angle_BxSx1xA), jnp.sin(angle_BxSx1xA)
    if scaling is not None:
        cos, sin = cos * scaling.attention_factor_value, sin * scaling.attention_factor_value
    x1, x2 = jnp.split(x_BxSxHxA.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxSxHxA.dtype)


def interleaved_to_half_permutation(dim: int) -> np.ndarray:
    """Feature order that turns interleaved-pair RoPE weights into rotate-half ones.

    An interleaved checkpoint rotates the pairs `(2i, 2i + 1)`; `rope` rotates `(i, i + dim/2)`.
    Taking the projection's rotated output features in the order `[0, 2, 4, ..., 1, 3, 5, ...]`
    (`kernel[..., perm]`) moves feature 2i to slot i and 2i + 1 to slot i + dim/2, so both
    layouts compute the same attention scores: `rope(x[..., perm]) == rope_interleaved(x)[...,
    perm]`, and the permutation of q and k cancels in q.k.

    Args:
      dim: the rotated width (even).

    Returns:
      `perm`, an int array of length `dim`.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"RoPE width {dim=} must be an even integer >= 2 (pairs rotate)")
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
