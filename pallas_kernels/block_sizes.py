"""Block sizes of the grouped-matmul kernels: a frozen dataclass, a heuristic and its checks.

`tm` rows of the grouped operand, `tk` of the contracted width and `tn` of the output width make
one block. The heuristic picks them per (M, K, N, dtype, backend); any choice can be overridden by
passing a `BlockSizes`, which is then validated against the shapes and the backend's layout rules.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax.numpy as jnp

BACKENDS = ("tpu", "gpu")
# JAX deprecates its Pallas Triton backend (0.12); where it is gone the GPU kernels are unsupported.
TRITON_AVAILABLE = importlib.util.find_spec("jax.experimental.pallas.triton") is not None


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows `tm`, contracted width `tk` and output width `tn` of one kernel block (hashable)."""

    tm: int
    tk: int
    tn: int


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    """The largest candidate dividing `n`, else `n` itself (a full-width block)."""
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return n


def _pow2_at_most(n: int, cap: int, floor: int) -> int:
    return max(floor, min(cap, 1 << max(n - 1, 0).bit_length()))


def default_block_sizes(
    m: int, k: int, n: int, dtype, backend: str, *, interpret: bool = False
) -> BlockSizes:
    """The heuristic block sizes for a `[m, k] x [k, n]` grouped matmul.

    Args:
      m, k, n: rows, contracted width and output width.
      dtype: the operands' dtype (bfloat16 halves the bytes of a block, so TPU blocks grow).
      backend: "tpu" (Mosaic) or "gpu" (Triton).
      interpret: few, large blocks (the interpreter's cost is per grid step).

    Returns:
      A `BlockSizes`; it passes `check_block_sizes` whenever `supported(k, n, dtype, backend)`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if interpret:
        tm = _pow2_at_most(m, 128, 8)
        return BlockSizes(
            tm, _largest_divisor(k, (512, 256, 128)), _largest_divisor(n, (512, 256, 128))
        )
    if backend == "tpu":  # double-buffered blocks + float32 accumulators well inside 16 MiB VMEM
        narrow = jnp.dtype(dtype).itemsize <= 2
        tm = _pow2_at_most(m, 512 if narrow else 256, 16)
        tk = _largest_divisor(k, (512, 256, 128))
        tn = _largest_divisor(n, (512, 256, 128))
        return BlockSizes(tm, tk, tn)
    # Triton pipelines GPU_STAGES copies of the fused SwiGLU kernel's blocks (x and two weights):
    # 48 KiB each with tk = 64 for 2-byte and tk = 32 for 4-byte dtypes, within A100's 164 KiB.
    tm = _pow2_at_most(m, 128, 16)
    tk_max = 64 if jnp.dtype(dtype).itemsize <= 2 else 32
    tk = _largest_divisor(k, tuple(c for c in (64, 32, 16) if c <= tk_max))
    return BlockSizes(tm, tk, _largest_divisor(n, (128, 64, 32, 16)))


GPU_STAGES = 3  # Triton software-pipeline depth of the grouped-matmul loops


def gpu_num_warps(bs: BlockSizes) -> int:
    """Warps per Triton program: 8 for 128 x 128 tiles, so two float32 accumulators (the fused
    SwiGLU kernel) take 128 registers per thread instead of spilling past 255."""
    return 8 if bs.tm * bs.tn >= 128 * 128 else 4


def check_block_sizes(
    bs: BlockSizes, k: int, n: int, dtype, backend: str, *, interpret: bool = False
) -> None:
    """Raises a ValueError naming the values if `bs` cannot tile `[*, k] x [k, n]` on `backend`.

    `tm` needs no divisibility (rows are padded to a multiple of it); `tk` and `tn` must divide
    `k` and `n`. Compiled kernels add the hardware's layout rules: TPU blocks are multiples of
    (8 or 16 for bfloat16, 128) unless they span the whole width, GPU blocks are powers of two
    >= 16.
    """
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    for name, value in (("tm", tm), ("tk", tk), ("tn", tn)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int ({bs=})")
    if k % tk:
        raise ValueError(
            f"{k=} is not a multiple of {tk=}; pick a divisor of k or leave block_sizes=None"
        )
    if n % tn:
        raise ValueError(
            f"{n=} is not a multiple of {tn=}; pick a divisor of n or leave block_sizes=None"
        )
    if interpret:
        return
    if backend == "tpu":
        sublane = 16 if jnp.dtype(dtype).itemsize <= 2 else 8
        if tm % sublane:
            raise ValueError(
                f"{tm=} is not a multiple of {sublane} for {jnp.dtype(dtype).name} on TPU"
            )
        for name, value, full in (("tk", tk, k), ("tn", tn, n)):
            if value % 128 and value != full:
                raise ValueError(
                    f"{name}={value} is neither a multiple of 128 nor the full width {full} (TPU)"
                )
    elif backend == "gpu":
        for name, value in (("tm", tm), ("tk", tk), ("tn", tn)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} is not a power of two >= 16 (GPU Triton blocks)")
    else:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def available(backend: str) -> bool:
    """Whether this JAX can compile the kernels for `backend` ("gpu" needs Pallas Triton)."""
    return backend == "tpu" or (backend == "gpu" and TRITON_AVAILABLE)


def supported(k: int, n: int, dtype, backend: str) -> bool:
    """Whether the compiled kernels take `[*, k] x [k, n]` in `dtype` with default blocks."""
    if jnp.dtype(dtype).name not in SUPPORTED_DTYPES or not available(backend):
        return False
    try:
        check_block_sizes(default_block_sizes(1, k, n, dtype, backend), k, n, dtype, backend)
    except ValueError:
        return False
    return True
