"""TPU (Mosaic) grouped-matmul kernels: the visit metadata is prefetched into SMEM.

The grid walks the `Visits` of `common.make_visits` (row tile, local group) in row order; the
block index maps read the prefetched metadata, so each step copies exactly the lhs tile and the
group's weight block it needs. Steps past `num_active` repeat the last real visit's block indices
(no copy) and skip all work: rows past `sum(group_sizes)` and empty groups cost nothing.
Forward only; `differentiable.py` wires the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.common import Visits, dot, row_mask, tpu_params

_UNREAD = pl.BlockSpec(memory_space=pl.ANY)  # a zero buffer aliased to an output, never copied


def _metadata(v: Visits) -> tuple[jax.Array, ...]:
    return (v.group, v.m_tile, v.row_start, v.row_end, v.num_active)


def gmm(
    lhs_MxK: jax.Array,
    rhs: tuple[jax.Array, ...],
    extras: tuple[jax.Array, ...],
    epilogue: Callable[..., tuple[jax.Array, ...]],
    out_dtypes: tuple,
    visits: Visits,
    bs: BlockSizes,
    *,
    transpose_rhs: bool,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """Per visit, `acc_r = lhs_tile @ rhs_r[group]` for each rhs, then `epilogue(*accs, *extras)`.

    Args:
      lhs_MxK: `[M, K]`, `M` a multiple of `bs.tm`.
      rhs: weights `[L, K, N]` each (`[L, N, K]` if `transpose_rhs`).
      extras: `[M, N]` arrays read by the epilogue, tile by tile.
      epilogue: float32 `(*acc_tiles, *extra_tiles) -> out_tiles`, elementwise.
      out_dtypes: dtype of each output `[M, N]`.
      visits: `common.make_visits(offsets, M, bs.tm)`.
      bs: block sizes dividing `K` and `N`.

    Returns:
      The outputs; zeros outside the local groups. Each output is a zero buffer aliased in, so
      the row tiles no visit touches (past `sum(group_sizes)`) are never written.
    """
    m, k = lhs_MxK.shape
    n = rhs[0].shape[1 if transpose_rhs else 2]
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    nk, nr, ne = k // tk, len(rhs), len(extras)

    no = len(out_dtypes)

    def kernel(group, m_tile, row_start, row_end, num_active, lhs_ref, *refs):
        rhs_refs, extra_refs = refs[:nr], refs[nr : nr + ne]
        out_refs, acc_refs = refs[nr + ne + no : -nr], refs[-nr:]  # skips the zero buffers
        i, kk = pl.program_id(1), pl.program_id(2)

        @pl.when((num_active[0] == 0) & (kk == nk - 1))
        def _no_rows():  # the pipeline still writes back the block the idle visits map to
            for o_ref in out_refs:
                o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        @pl.when(i < num_active[0])
        def _visit():
            @pl.when(kk == 0)
            def _zero():
                for acc in acc_refs:
                    acc[...] = jnp.zeros(acc.shape, jnp.float32)

            x = lhs_ref[...]
            for acc, w in zip(acc_refs, rhs_refs, strict=True):
                acc[...] += dot(x, w[...], transpose_b=transpose_rhs)

            @pl.when(kk == nk - 1)
            def _store():
                tiles = [e[...].astype(jnp.float32) for e in extra_refs]
                outs = epilogue(*(acc[...] for acc in acc_refs), *tiles)
                mask = row_mask(m_tile[i] * tm, tm, row_start[i], row_end[i], tn)
                first = (i == 0) | (m_tile[jnp.maximum(i - 1, 0)] != m_tile[i])
                for o_ref, o in zip(out_refs, outs, strict=True):

                    @pl.when(first)
                    def _init(o_ref=o_ref):
                        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

                    kept = o_ref[...].astype(jnp.float32)  # selects in float32 (see tgmm)
                    o_ref[...] = jnp.where(mask, o, kept).astype(o_ref.dtype)

    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, i, kk, g, mt, *_: (g[i], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, i, kk, g, mt, *_: (g[i], kk, j))
    lhs_spec = pl.BlockSpec((tm, tk), lambda j, i, kk, g, mt, *_: (mt[i], kk))
    row_spec = pl.BlockSpec((tm, tn), lambda j, i, kk, g, mt, *_: (mt[i], j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(n // tn, visits.size, nk),
        in_specs=[lhs_spec, *[rhs_spec] * nr, *[row_spec] * ne, *[_UNREAD] * no],
        out_specs=[row_spec] * no,
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)] * nr,
    )
    zeros = [jnp.zeros((m, n), d) for d in out_dtypes]
    first_zero = 5 + 1 + nr + ne  # operand index, scalar-prefetch operands included
    return tuple(
        pl.pallas_call(
            kernel,
            grid_spec=grid_spec,
            out_shape=[jax.ShapeDtypeStruct((m, n), d) for d in out_dtypes],
            input_output_aliases={first_zero + o: o for o in range(no)},
            compiler_params=tpu_params(interpret, ("parallel", "arbitrary", "arbitrary")),
            interpret=interpret,
        )(*_metadata(visits), lhs_MxK, *rhs, *extras, *zeros)
    )


def tgmm(
    lhs_MxK: jax.Array,
    rhs_MxN: jax.Array,
    visits: Visits,
    num_local: int,
    bs: BlockSizes,
    *,
    out_dtype,
    interpret: bool,
) -> jax.Array:
    """`out[g] = lhs[rows of g].T @ rhs[rows of g]` for each visited local group: `[L, K, N]`.

    Groups with no rows are never visited: the output is a zero buffer aliased in.
    """
    m, k = lhs_MxK.shape
    n = rhs_MxN.shape[1]
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    size = visits.size

    def kernel(
        group, m_tile, row_start, row_end, num_active, lhs_ref, rhs_ref, _, out_ref, acc_ref
    ):
        i = pl.program_id(2)

        @pl.when(num_active[0] == 0)
        def _no_rows():  # the pipeline still writes back the block the idle visits map to
            out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

        @pl.when(i < num_active[0])
        def _visit():
            g = group[i]
            first = (i == 0) | (group[jnp.maximum(i - 1, 0)] != g)
            last = (i + 1 >= num_active[0]) | (group[jnp.minimum(i + 1, size - 1)] != g)

            @pl.when(first)
            def _zero():
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

            mask_k = row_mask(m_tile[i] * tm, tm, row_start[i], row_end[i], tk)
            mask_n = row_mask(m_tile[i] * tm, tm, row_start[i], row_end[i], tn)
            # Both sides masked: rows of other groups may hold anything, NaN included. The
            # selects and the transpose run in float32 (TPU v4 / v5e have no bfloat16 VPU), the
            # matmul in the input dtype.
            x = jnp.where(mask_k, lhs_ref[...].astype(jnp.float32), 0.0)
            dy = jnp.where(mask_n, rhs_ref[...].astype(jnp.float32), 0.0)
            acc_ref[...] += dot(x.T.astype(lhs_ref.dtype), dy.astype(rhs_ref.dtype))

            @pl.when(last)
            def _store():
                out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(k // tk, n // tn, size),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda kk, j, i, g, mt, *_: (mt[i], kk)),
            pl.BlockSpec((tm, tn), lambda kk, j, i, g, mt, *_: (mt[i], j)),
            _UNREAD,
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda kk, j, i, g, mt, *_: (g[i], kk, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        input_output_aliases={5 + 2: 0},
        compiler_params=tpu_params(interpret, ("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*_metadata(visits), lhs_MxK, rhs_MxN, jnp.zeros((num_local, k, n), out_dtype))
