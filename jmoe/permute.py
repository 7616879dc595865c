"""Row permutations whose backward pass is a gather too.

`jnp.take` differentiates into a scatter-add, which XLA runs serially on CPU. A partial
permutation knows its inverse, so both directions can be gathers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def permute_rows(x_MxD: jax.Array, src_P: jax.Array, inverse_M: jax.Array) -> jax.Array:
    """Returns `y[p] = x[src[p]]`, or zeros where `src[p]` is out of range.

    Args:
      x_MxD: rows to permute.
      src_P: int32 source row of each output row; any value >= M gives a zero row.
      inverse_M: int32 output row of each input row (`src[inverse[m]] == m`); any value >= P
        marks a row that no output takes (its gradient is zero).
    """
    return jnp.take(x_MxD, src_P, axis=0, mode="fill", fill_value=0)


def _permute_fwd(x_MxD, src_P, inverse_M):
    return permute_rows(x_MxD, src_P, inverse_M), (src_P, inverse_M)


def _permute_bwd(res, dy_PxD):
    src_P, inverse_M = res
    return permute_rows(dy_PxD, inverse_M, src_P), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)
