"""Dequantisation of quantised checkpoint tensors, to float32 NumPy.

- FP8 with block scales (DeepSeek-V3): a `float8_e4m3fn` weight `[O, I]` and `weight_scale_inv`
  `[ceil(O / b), ceil(I / b)]` (b = 128): element (o, i) is `w[o, i] * scale[o // b, i // b]`.
- MXFP4 (GPT-OSS experts): `_blocks` uint8 `[..., G, 16]`, each byte two e2m1 values (low
  nibble first), 32 values per block, and `_scales` uint8 `[..., G]`, an e8m0 power of two per
  block: value = fp4 * 2**(scale - 127). The result is `[..., G * 32]`.

Both use the `ml_dtypes` number formats for the element and scale decoding.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128


def dequantize_fp8_blocks(
    w_OxI: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK
) -> np.ndarray:
    """A block-scaled FP8 weight as float32 `[O, I]` (see the module docstring)."""
    o, i = w_OxI.shape
    expected = (-(-o // block), -(-i // block))
    if scale_inv.shape != expected:
        raise ValueError(
            f"FP8 weight {w_OxI.shape} needs block scales {expected} for {block}x{block} "
            f"blocks, got {scale_inv.shape}"
        )
    # 1. Each scale covers a block x block tile; the last row / column of tiles may be partial.
    scale_OxI = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:o, :i]
    return w_OxI.astype(np.float32) * scale_OxI


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 `blocks [..., G, 16]` uint8 and `scales [..., G]` uint8 as float32 `[..., G * 32]`."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype}, {scales.dtype}"
        )
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {blocks.shape} and scales {scales.shape} disagree: the scales must be "
            "the blocks' shape without the last axis"
        )
    # 2. Low nibble is the even element, high nibble the odd one: [..., G, 16, 2] -> [..., G, 32].
    nibbles = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, -1)
    values = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    powers = scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)[..., None]
    return (values * powers).reshape(*scales.shape[:-1], -1)
