"""Differentiable grouped matmul and fused SwiGLU: `jax.custom_vjp` over the forward kernels.

`gmm` and `swiglu` are the forward kernels of `pallas_kernels.grouped_matmul` themselves, wrapped:
they keep those signatures and docstrings, and only the backward rules are written here.

- `gmm`: activation gradient = `gmm` with the weights transposed, weight gradient = `tgmm`.
- `swiglu`: the backward kernel recomputes both projections and emits `(d gate, d up)` in its
  epilogue (nothing `[M, F]` is saved by the forward), then two transposed `gmm` for `dx` and two
  `tgmm` for the weights.

Block sizes given for the forward `[M, K] x [K, N]` are reused, with `tk` and `tn` swapped, for the
transposed `[M, N] x [N, K]` product, so one valid choice is valid for the whole step. Group sizes
and the group offset are integers: their cotangents are zero (`None`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.grouped_matmul import gmm as gmm_forward
from pallas_kernels.grouped_matmul import swiglu as swiglu_forward
from pallas_kernels.grouped_matmul import swiglu_bwd, tgmm


def _transposed(block_sizes: BlockSizes | None) -> BlockSizes | None:
    """The blocks of the transposed product: `tk` and `tn` swapped."""
    if block_sizes is None:
        return None
    return BlockSizes(block_sizes.tm, block_sizes.tn, block_sizes.tk)


# Static arguments of `gmm_forward`: transpose_rhs, block_sizes, backend, interpret.
gmm = jax.custom_vjp(gmm_forward, nondiff_argnums=(4, 5, 6, 7))


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, transpose_rhs, block_sizes, backend, interpret):
    y = gmm_forward(
        lhs, rhs, group_sizes, group_offset, transpose_rhs, block_sizes, backend, interpret
    )
    return y, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(transpose_rhs, block_sizes, backend, interpret, res, dy):
    lhs, rhs, group_sizes, group_offset = res
    dy = dy.astype(lhs.dtype)
    dx = gmm_forward(
        dy, rhs, group_sizes, group_offset, not transpose_rhs, _transposed(block_sizes), backend,
        interpret,
    )  # fmt: skip
    weight_grad = functools.partial(
        tgmm, group_sizes=group_sizes, num_local=rhs.shape[0], group_offset=group_offset,
        backend=backend, interpret=interpret,
    )  # fmt: skip
    if transpose_rhs:  # rhs is [L, N, K]: its gradient is dy.T @ lhs per group
        dw = weight_grad(dy, lhs, block_sizes=_transposed(block_sizes))
    else:
        dw = weight_grad(lhs, dy, block_sizes=block_sizes)
    return dx, dw.astype(rhs.dtype), None, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)

# Static arguments of `swiglu_forward`: block_sizes, backend, interpret.
swiglu = jax.custom_vjp(swiglu_forward, nondiff_argnums=(5, 6, 7))


def _swiglu_fwd(x, w_gate, w_up, group_sizes, group_offset, block_sizes, backend, interpret):
    h = swiglu_forward(x, w_gate, w_up, group_sizes, group_offset, block_sizes, backend, interpret)
    return h, (x, w_gate, w_up, group_sizes, group_offset)


def _swiglu_bwd(block_sizes, backend, interpret, res, dh):
    x, w_gate, w_up, group_sizes, group_offset = res
    kw = dict(group_offset=group_offset, backend=backend, interpret=interpret)
    d_gate, d_up = swiglu_bwd(
        x, w_gate, w_up, dh.astype(x.dtype), group_sizes, block_sizes=block_sizes, **kw
    )
    back = functools.partial(
        gmm_forward, group_sizes=group_sizes, transpose_rhs=True,
        block_sizes=_transposed(block_sizes), **kw,
    )  # fmt: skip
    dx = back(d_gate, w_gate).astype(jnp.float32)
    dx = (dx + back(d_up, w_up)).astype(x.dtype)
    weight_grad = functools.partial(
        tgmm, group_sizes=group_sizes, num_local=w_gate.shape[0], block_sizes=block_sizes, **kw
    )
    dw_gate, dw_up = weight_grad(x, d_gate), weight_grad(x, d_up)
    return dx, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype), None, None


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
