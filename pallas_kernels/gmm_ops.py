"""Differentiable grouped matmul and fused SwiGLU: `jax.custom_vjp` over the forward kernels.

- `gmm`: activation gradient = `gmm` with the weights transposed, weight gradient = `tgmm`.
- `swiglu`: the backward kernel recomputes both projections and emits `(d gate, d up)` in its
  epilogue (nothing `[M, F]` is saved by the forward), then two transposed `gmm` for `dx` and two
  `tgmm` for the weights.

Block sizes given for the forward `[M, K] x [K, N]` are reused, with `tk` and `tn` swapped, for the
transposed `[M, N] x [N, K]` product, so one valid choice is valid for the whole step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.gmm import gmm as gmm_fwd
from pallas_kernels.gmm import swiglu as swiglu_fwd
from pallas_kernels.gmm import swiglu_bwd, tgmm


@dataclasses.dataclass(frozen=True)
class _Options:
    block_sizes: BlockSizes | None
    backend: str | None
    interpret: bool

    def kw(self, transposed: bool = False) -> dict:
        bs = self.block_sizes
        if bs is not None and transposed:
            bs = BlockSizes(bs.tm, bs.tn, bs.tk)
        return dict(block_sizes=bs, backend=self.backend, interpret=self.interpret)


def _int_zeros(a):
    """The cotangent of an integer input (group sizes, group offset)."""
    return None if a is None else jnp.zeros(jnp.shape(a), jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm(x, w, group_sizes, group_offset, transpose_rhs, opts):
    return gmm_fwd(
        x, w, group_sizes, group_offset=group_offset, transpose_rhs=transpose_rhs, **opts.kw()
    )


def _gmm_fwd(x, w, group_sizes, group_offset, transpose_rhs, opts):
    y = _gmm(x, w, group_sizes, group_offset, transpose_rhs, opts)
    return y, (x, w, group_sizes, group_offset)


def _gmm_bwd(transpose_rhs, opts, res, dy):
    x, w, group_sizes, group_offset = res
    dy = dy.astype(x.dtype)
    dx = gmm_fwd(
        dy, w, group_sizes, group_offset=group_offset, transpose_rhs=not transpose_rhs,
        **opts.kw(transposed=True),
    )  # fmt: skip
    tg = functools.partial(
        tgmm, group_sizes=group_sizes, num_local=w.shape[0], group_offset=group_offset
    )
    dw = tg(dy, x, **opts.kw(transposed=True)) if transpose_rhs else tg(x, dy, **opts.kw())
    return dx, dw.astype(w.dtype), _int_zeros(group_sizes), _int_zeros(group_offset)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    transpose_rhs: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Differentiable `pallas_kernels.gmm.gmm` (same arguments); gradients in `lhs` and `rhs`.

    Example:
      >>> x = jnp.ones((4, 128)); w = jnp.ones((2, 128, 128))
      >>> jax.grad(lambda w: gmm(x, w, jnp.array([1, 2]), interpret=True).sum())(w)[:, 0, 0]
      Array([1., 2.], dtype=float32)
    """
    opts = _Options(block_sizes, backend, interpret)
    group_offset = jnp.asarray(group_offset, jnp.int32)
    return _gmm(lhs_MxK, rhs_GxKxN, jnp.asarray(group_sizes, jnp.int32), group_offset,
                transpose_rhs, opts)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu(x, w_gate, w_up, group_sizes, group_offset, opts):
    return swiglu_fwd(x, w_gate, w_up, group_sizes, group_offset=group_offset, **opts.kw())


def _swiglu_fwd(x, w_gate, w_up, group_sizes, group_offset, opts):
    h = _swiglu(x, w_gate, w_up, group_sizes, group_offset, opts)
    return h, (x, w_gate, w_up, group_sizes, group_offset)


def _swiglu_bwd(opts, res, dh):
    x, w_gate, w_up, group_sizes, group_offset = res
    local = dict(group_offset=group_offset)
    d_gate, d_up = swiglu_bwd(
        x, w_gate, w_up, dh.astype(x.dtype), group_sizes, **local, **opts.kw()
    )
    back = functools.partial(gmm_fwd, group_sizes=group_sizes, transpose_rhs=True, **local)
    dx = back(d_gate, w_gate, **opts.kw(True)).astype(jnp.float32)
    dx = (dx + back(d_up, w_up, **opts.kw(True))).astype(x.dtype)
    tg = functools.partial(tgmm, group_sizes=group_sizes, num_local=w_gate.shape[0],
                           **local, **opts.kw())  # fmt: skip
    dw_gate, dw_up = tg(x, d_gate), tg(x, d_up)
    return (dx, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
            _int_zeros(group_sizes), _int_zeros(group_offset))  # fmt: skip


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(
    x_MxD: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Differentiable fused SwiGLU `silu(x @ w_gate[g]) * (x @ w_up[g])`: `[M, F]`.

    Args:
      x_MxD: `[M, D]` rows sorted by group.
      w_gate, w_up: `[L, D, F]` local experts' gate and up projections.
      group_sizes: `[G]` int32 rows per group.
      group_offset, block_sizes, backend, interpret: as in `gmm`.

    Returns:
      `[M, F]` in `x.dtype`; zeros outside the local groups. Differentiable in `x` and weights.
    """
    opts = _Options(block_sizes, backend, interpret)
    group_offset = jnp.asarray(group_offset, jnp.int32)
    return _swiglu(x_MxD, w_gate, w_up, jnp.asarray(group_sizes, jnp.int32), group_offset, opts)
