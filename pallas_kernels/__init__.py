"""Pallas kernels for Mixture-of-Experts (never imports jmoe).

- `gmm` / `tgmm`: grouped matmul `[M, K] x [G, K, N] -> [M, N]` and its transposed form (the
  weight gradient).
- `swiglu`: the fused SwiGLU expert input `silu(x @ w_gate[g]) * (x @ w_up[g])`.
`gmm` and `swiglu` are differentiable (`jax.custom_vjp` in `differentiable.py`).
- `top_k_gating`: router matmul, scores, bias and top-k in one kernel.

Each runs on TPU (Mosaic) and GPU (Triton), and in the Pallas interpreter (`interpret=True`).
"""

from pallas_kernels.block_sizes import (
    BlockSizes,
    available,
    check_block_sizes,
    default_block_sizes,
    supported,
)
from pallas_kernels.differentiable import gmm, swiglu
from pallas_kernels.gating import top_k_gating
from pallas_kernels.grouped_matmul import tgmm

__all__ = [
    "BlockSizes",
    "available",
    "check_block_sizes",
    "default_block_sizes",
    "gmm",
    "supported",
    "swiglu",
    "tgmm",
    "top_k_gating",
]
