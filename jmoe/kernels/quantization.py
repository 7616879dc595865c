"""Weight-only quantization of grouped weights: symmetric, one scale per group and output column.

A weight `w [G, K, N]` is stored as `q [G, K, N]` (int8, or float8 e4m3 "fp8") and a float32
`scale [G, N]` with `w ~= q * scale[:, None, :]`. Because each scale multiplies one output column,
`x @ (q * s) == (x @ q) * s`: the grouped matmuls convert one group's `q` at a time to the rows'
dtype and scale the product's columns, never holding a full-precision copy of `w`.

- "int8": `scale = max|w| / 127` per column, `q = round(w / scale)` in [-127, 127]; the error is
  at most `scale / 2` per entry.
- "fp8": `scale = max|w| / 448` (e4m3's largest finite value), `q = w / scale` rounded to the
  nearest e4m3 value; the error is at most `2^-4 |w|` (3 mantissa bits), or `2^-10 scale` for
  entries below e4m3's smallest normal `2^-6 scale`.
A column of zeros gets `scale = 1` (and `q = 0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANTIZATIONS = ("int8", "fp8")

STORAGE_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
# The largest magnitude each storage dtype holds: 127 keeps int8 symmetric (no -128).
_LARGEST = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}


def check_kind(kind: str) -> None:
    """Raises a ValueError naming the allowed kinds unless `kind` is one of `QUANTIZATIONS`."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization kind {kind!r} is not one of {QUANTIZATIONS}")


def quantize(w_GxKxN: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """`(q [G, K, N], scale [G, N] float32)` with `w ~= q * scale[:, None, :]` (module docstring).

    Args:
      w_GxKxN: float weights, one `[K, N]` matrix per group (any leading axes before K, N are
        groups too: a scanned stack `[L, G, K, N]` gives scales `[L, G, N]`).
      kind: "int8" or "fp8".
    """
    check_kind(kind)
    w = jnp.asarray(w_GxKxN, jnp.float32)
    amax_GxN = jnp.max(jnp.abs(w), axis=-2)
    scale_GxN = jnp.where(amax_GxN > 0, amax_GxN / _LARGEST[kind], 1.0)
    ratio = w / scale_GxN[..., None, :]
    if kind == "int8":
        ratio = jnp.clip(jnp.round(ratio), -127, 127)
    return ratio.astype(STORAGE_DTYPES[kind]), scale_GxN


def dequantize(q_GxKxN: jax.Array, scale_GxN: jax.Array, dtype=jnp.float32) -> jax.Array:
    """`q * scale[..., None, :]` in `dtype`: the float weights a quantized weight stands for."""
    w = jnp.asarray(q_GxKxN).astype(jnp.float32) * jnp.asarray(scale_GxN)[..., None, :]
    return w.astype(dtype)


def is_quantized(w: jax.Array) -> bool:
    """Whether `w` is stored in one of `STORAGE_DTYPES`."""
    return jnp.dtype(w.dtype) in STORAGE_DTYPES.values()
