"""GPU (Triton) grouped-matmul kernels: the group metadata is read inside the kernel.

Triton has no scalar prefetch, so the grid is the plain output grid and each program finds its
groups itself. `gmm`: program (row tile, column tile) loops over the local groups overlapping its
rows (`common.tile_group_range`), masking the rows of the others; a tile past the local rows loops
zero times and stores zeros. `tgmm`: program (group, k tile, n tile) loops over the row tiles of
its group only, so empty groups and rows past `sum(group_sizes)` cost nothing.
Forward only; `differentiable.py` wires the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sizes import GPU_STAGES, BlockSizes, gpu_num_warps
from pallas_kernels.common import dot, row_mask, triton_params

_WHOLE = pl.no_block_spec  # an unblocked input: the kernel indexes it itself


def _compiler_params(bs: BlockSizes, interpret: bool):
    return triton_params(interpret, num_warps=gpu_num_warps(bs), num_stages=GPU_STAGES)


def gmm(
    lhs_MxK: jax.Array,
    rhs: tuple[jax.Array, ...],
    extras: tuple[jax.Array, ...],
    epilogue: Callable[..., tuple[jax.Array, ...]],
    out_dtypes: tuple,
    offsets_L1: jax.Array,
    tile_groups: tuple[jax.Array, jax.Array],
    bs: BlockSizes,
    *,
    transpose_rhs: bool,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """Per output tile, `acc_r = sum_g mask_g(lhs_tile) @ rhs_r[g]`, then the epilogue.

    Same contract as `gmm_tpu.gmm`, except that every tile is written: rows in no local group
    are zeros.
    """
    m, k = lhs_MxK.shape
    n = rhs[0].shape[1 if transpose_rhs else 2]
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    nk, nr, ne = k // tk, len(rhs), len(extras)
    first_T, last_T = tile_groups

    def kernel(offsets_ref, first_ref, last_ref, lhs_ref, *refs):
        rhs_refs, extra_refs, out_refs = refs[:nr], refs[nr : nr + ne], refs[nr + ne :]
        t, j = pl.program_id(0), pl.program_id(1)
        row0 = t * tm

        def group_body(g, accs):
            start, end = offsets_ref[g], offsets_ref[g + 1]
            mask = row_mask(row0, tm, start, end)

            def k_body(kk, accs):
                x = lhs_ref[pl.ds(row0, tm), pl.ds(kk * tk, tk)]
                x = jnp.where(mask, x, jnp.zeros((), x.dtype))
                if transpose_rhs:
                    ws = [w[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)] for w in rhs_refs]
                else:
                    ws = [w[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)] for w in rhs_refs]
                return tuple(
                    a + dot(x, w, transpose_b=transpose_rhs) for a, w in zip(accs, ws, strict=True)
                )

            # An empty group inside the tile's range is skipped, not multiplied by a zero mask.
            run = lambda accs: jax.lax.fori_loop(0, nk, k_body, accs)  # noqa: E731
            return jax.lax.cond(end > start, run, lambda accs: accs, accs)

        zeros = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in range(nr))
        accs = jax.lax.fori_loop(first_ref[t], last_ref[t], group_body, zeros)
        outs = epilogue(*accs, *(e[...].astype(jnp.float32) for e in extra_refs))
        lo, hi = offsets_ref[0], offsets_ref[offsets_L1.shape[0] - 1]
        valid = row_mask(row0, tm, lo, hi)
        for o_ref, o in zip(out_refs, outs, strict=True):
            o_ref[...] = jnp.where(valid, o, 0.0).astype(o_ref.dtype)

    row_spec = pl.BlockSpec((tm, tn), lambda t, j: (t, j))
    return tuple(
        pl.pallas_call(
            kernel,
            grid=(m // tm, n // tn),
            in_specs=[
                _WHOLE,
                _WHOLE,
                _WHOLE,
                _WHOLE,
                *[_WHOLE] * nr,
                *[row_spec] * ne,
            ],
            out_specs=[row_spec] * len(out_dtypes),
            out_shape=[jax.ShapeDtypeStruct((m, n), d) for d in out_dtypes],
            compiler_params=_compiler_params(bs, interpret),
            interpret=interpret,
        )(offsets_L1, first_T, last_T, lhs_MxK, *rhs, *extras)
    )


def tgmm(
    lhs_MxK: jax.Array,
    rhs_MxN: jax.Array,
    offsets_L1: jax.Array,
    bs: BlockSizes,
    *,
    out_dtype,
    interpret: bool,
) -> jax.Array:
    """`out[g] = lhs[rows of g].T @ rhs[rows of g]` for each local group: `[L, K, N]`, empty
    groups zero."""
    m, k = lhs_MxK.shape
    n = rhs_MxN.shape[1]
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    num_local = offsets_L1.shape[0] - 1

    def kernel(offsets_ref, lhs_ref, rhs_ref, out_ref):
        g, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = offsets_ref[g], offsets_ref[g + 1]

        def tile_body(t, acc):
            mask = row_mask(t * tm, tm, start, end)
            x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
            x = jnp.where(mask, x, jnp.zeros((), x.dtype))
            dy = rhs_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)]
            dy = jnp.where(mask, dy, jnp.zeros((), dy.dtype))  # other rows may hold NaN
            return acc + dot(x, dy, transpose_a=True)

        first = start // tm
        stop = jnp.where(end > start, (end + tm - 1) // tm, first)
        acc = jax.lax.fori_loop(first, stop, tile_body, jnp.zeros((tk, tn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(num_local, k // tk, n // tn),
        in_specs=[_WHOLE, _WHOLE, _WHOLE],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j)),
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        compiler_params=_compiler_params(bs, interpret),
        interpret=interpret,
    )(offsets_L1, lhs_MxK, rhs_MxN)
