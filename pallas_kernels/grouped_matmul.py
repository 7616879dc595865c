"""Forward-only grouped-matmul kernels: `gmm`, `tgmm` and the fused SwiGLU pair.

Each entry validates its shapes and block sizes, pads the rows to a multiple of `tm`, plans the
group metadata and calls the backend's kernel (`gmm_tpu` for Mosaic, `gmm_gpu` for Triton).
Rows sorted by group; only local groups `[group_offset, group_offset + L)` are computed, where
`L = rhs.shape[0]`; every other row comes out as zeros without being read. No gradients here:
`differentiable.py` wraps `gmm` and `swiglu` in `jax.custom_vjp`, which takes every argument by
position, so their arguments are positional-or-keyword (none keyword-only).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import common, gmm_gpu, gmm_tpu
from pallas_kernels.block_sizes import BlockSizes, check_block_sizes, default_block_sizes


def _check_groups(group_sizes: jax.Array, num_local: int, group_offset) -> None:
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [G], got shape {group_sizes.shape}")
    if num_local > group_sizes.shape[0]:
        raise ValueError(
            f"{num_local=} local groups exceed the {group_sizes.shape[0]} groups of group_sizes"
        )
    if isinstance(group_offset, int) and not 0 <= group_offset <= group_sizes.shape[0] - num_local:
        raise ValueError(
            f"{group_offset=} must be in [0, {group_sizes.shape[0] - num_local}] for "
            f"{num_local} local groups of {group_sizes.shape[0]}"
        )


def _blocks(block_sizes, m, k, n, dtype, backend, interpret) -> BlockSizes:
    bs = block_sizes or default_block_sizes(m, k, n, dtype, backend, interpret=interpret)
    check_block_sizes(bs, k, n, dtype, backend, interpret=interpret)
    return bs


def grouped(
    lhs_MxK: jax.Array,
    rhs: tuple[jax.Array, ...],
    group_sizes: jax.Array,
    *,
    extras: tuple[jax.Array, ...] = (),
    epilogue: Callable[..., tuple[jax.Array, ...]] = lambda acc: (acc,),
    out_dtypes: tuple | None = None,
    group_offset: jax.Array | int = 0,
    transpose_rhs: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The shared grouped kernel: float32 `acc_r = x @ rhs_r[g]` per row, then an elementwise
    `epilogue(*accs, *extras)` whose outputs are stored (see `gmm` for the arguments)."""
    backend = common.default_backend(backend)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    m, k = lhs_MxK.shape
    num_local = rhs[0].shape[0]
    n = rhs[0].shape[1 if transpose_rhs else 2]
    if rhs[0].shape[2 if transpose_rhs else 1] != k:
        raise ValueError(f"lhs is [M, {k}] but rhs is {rhs[0].shape} ({transpose_rhs=})")
    _check_groups(group_sizes, num_local, group_offset)
    out_dtypes = out_dtypes or (lhs_MxK.dtype,)
    if m == 0 or num_local == 0:
        return tuple(jnp.zeros((m, n), d) for d in out_dtypes)
    bs = _blocks(block_sizes, m, k, n, lhs_MxK.dtype, backend, interpret)
    offsets = common.local_offsets(group_sizes, group_offset, num_local)
    x = common.pad_rows(lhs_MxK, bs.tm)
    extras = tuple(common.pad_rows(e, bs.tm) for e in extras)
    mp = x.shape[0]
    if backend == "gpu":
        ranges = common.tile_group_range(offsets, mp, bs.tm)
        outs = gmm_gpu.gmm(
            x, rhs, extras, epilogue, out_dtypes, offsets, ranges, bs,
            transpose_rhs=transpose_rhs, interpret=interpret,
        )  # fmt: skip
    else:
        outs = gmm_tpu.gmm(
            x, rhs, extras, epilogue, out_dtypes, common.make_visits(offsets, mp, bs.tm), bs,
            transpose_rhs=transpose_rhs, interpret=interpret,
        )  # fmt: skip
    return tuple(o[:m] for o in outs)


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array | int = 0,
    transpose_rhs: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul `y[r] = lhs[r] @ rhs[g - group_offset]` for each row `r` of group `g`.

    Args:
      lhs_MxK: `[M, K]` rows sorted by group.
      rhs_GxKxN: `[L, K, N]` weights of the local groups (`[L, N, K]` if `transpose_rhs`).
      group_sizes: `[G]` int32 rows per group, `G >= L`, `sum <= M`.
      group_offset: first local group (expert parallelism); rows of other groups give zeros.
      transpose_rhs: multiply by `rhs[g].T` (the activation gradient).
      block_sizes: override of `default_block_sizes`.
      backend: "tpu" (Mosaic) or "gpu" (Triton); None: the device's, "tpu" on CPU.
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      `[M, N]` in `lhs.dtype`, float32 accumulation; zeros outside the local groups. Through
      `pallas_kernels.gmm` (this function under `jax.custom_vjp`) differentiable in `lhs` and
      `rhs`.

    Example:
      >>> x = jnp.ones((4, 128)); w = jnp.ones((2, 128, 128))
      >>> gmm(x, w, jnp.array([1, 2]), interpret=True)[:, 0].tolist()
      [128.0, 128.0, 128.0, 0.0]
    """
    return grouped(
        lhs_MxK, (rhs_GxKxN,), group_sizes, group_offset=group_offset, transpose_rhs=transpose_rhs,
        block_sizes=block_sizes, backend=backend, interpret=interpret,
    )[0]  # fmt: skip


def tgmm(
    lhs_MxK: jax.Array,
    rhs_MxN: jax.Array,
    group_sizes: jax.Array,
    *,
    num_local: int | None = None,
    group_offset: jax.Array | int = 0,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Transposed grouped matmul (the weight gradient): `out[g] = lhs[rows g].T @ rhs[rows g]`.

    Args:
      lhs_MxK: `[M, K]` rows sorted by group.
      rhs_MxN: `[M, N]` rows sorted by group.
      group_sizes: `[G]` int32 rows per group.
      num_local: local groups computed (default `G`), starting at `group_offset`.
      block_sizes, backend, interpret: as in `gmm` (`tk`, `tn` tile the output `[K, N]`).

    Returns:
      `[L, K, N]` in `lhs.dtype`, float32 accumulation; zeros for empty groups.
    """
    backend = common.default_backend(backend)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    num_local = group_sizes.shape[0] if num_local is None else num_local
    _check_groups(group_sizes, num_local, group_offset)
    (m, k), n = lhs_MxK.shape, rhs_MxN.shape[1]
    if rhs_MxN.shape[0] != m:
        raise ValueError(f"lhs has {m} rows but rhs has {rhs_MxN.shape[0]}")
    if m == 0 or num_local == 0:
        return jnp.zeros((num_local, k, n), lhs_MxK.dtype)
    bs = _blocks(block_sizes, m, k, n, lhs_MxK.dtype, backend, interpret)
    offsets = common.local_offsets(group_sizes, group_offset, num_local)
    x, dy = common.pad_rows(lhs_MxK, bs.tm), common.pad_rows(rhs_MxN, bs.tm)
    if backend == "gpu":
        return gmm_gpu.tgmm(x, dy, offsets, bs, out_dtype=lhs_MxK.dtype, interpret=interpret)
    visits = common.make_visits(offsets, x.shape[0], bs.tm)
    return gmm_tpu.tgmm(x, dy, visits, num_local, bs, out_dtype=lhs_MxK.dtype, interpret=interpret)


def swiglu_epilogue(gate: jax.Array, up: jax.Array) -> tuple[jax.Array]:
    return (jax.nn.silu(gate) * up,)


def swiglu_bwd_epilogue(gate: jax.Array, up: jax.Array, dh: jax.Array) -> tuple[jax.Array, ...]:
    """`(d gate, d up)` of `h = silu(gate) * up` given `dh`."""
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return dh * up * (sig + silu * (1.0 - sig)), dh * silu


def swiglu(
    x_MxD: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array | int = 0,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Fused SwiGLU expert input: `silu(x @ w_gate[g]) * (x @ w_up[g])`.

    Both projections accumulate side by side in one kernel and only `h` is stored: the two
    `[M, F]` pre-activations never reach memory.

    Args:
      x_MxD: `[M, D]` rows sorted by group.
      w_gate, w_up: `[L, D, F]` local experts' gate and up projections.
      group_sizes: `[G]` int32 rows per group.
      group_offset, block_sizes, backend, interpret: as in `gmm`.

    Returns:
      `[M, F]` in `x.dtype`; zeros outside the local groups. Through `pallas_kernels.swiglu`
      differentiable in `x` and both weights.
    """
    return grouped(
        x_MxD, (w_gate, w_up), group_sizes, epilogue=swiglu_epilogue, group_offset=group_offset,
        block_sizes=block_sizes, backend=backend, interpret=interpret,
    )[0]  # fmt: skip


def swiglu_bwd(
    x_MxD: jax.Array, w_gate: jax.Array, w_up: jax.Array, dh_MxF: jax.Array, group_sizes, **kw
) -> tuple[jax.Array, jax.Array]:
    """`(d gate, d up)` `[M, F]` of `swiglu`, recomputing both projections in one kernel."""
    return grouped(
        x_MxD, (w_gate, w_up), group_sizes, extras=(dh_MxF,), epilogue=swiglu_bwd_epilogue,
        out_dtypes=(x_MxD.dtype, x_MxD.dtype), **kw,
    )  # fmt: skip
