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
    if x_MxD.shape[0] == 0:  # nothing to take: every output row is a zero row
        return jnp.zeros((src_P.shape[0], *x_MxD.shape[1:]), x_MxD.dtype)
    return jnp.take(x_MxD, src_P, axis=0, mode="fill", fill_value=0)


def _permute_fwd(x_MxD, src_P, inverse_M):
    return permute_rows(x_MxD, src_P, inverse_M), (src_P, inverse_M)


def _permute_bwd(res, dy_PxD):
    src_P, inverse_M = res
    return permute_rows(dy_PxD, inverse_M, src_P), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def _gather_slots_impl(x_TxD, src_slot_R, slot_to_row_M, k):
    return jnp.take(x_TxD, src_slot_R // k, axis=0)


def _gather_slots_fwd(x_TxD, src_slot_R, slot_to_row_M, k):
    return _gather_slots_impl(x_TxD, src_slot_R, slot_to_row_M, k), (src_slot_R, slot_to_row_M)


def _gather_slots_bwd(k, res, dy_RxD):
    src_slot_R, slot_to_row_M = res
    dslots_MxD = permute_rows(dy_RxD, slot_to_row_M, src_slot_R)
    return dslots_MxD.reshape(-1, k, dy_RxD.shape[-1]).sum(1), None, None


gather_slots = jax.custom_vjp(_gather_slots_impl, nondiff_argnums=(3,))
gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)
gather_slots.__doc__ = """Rows of the tokens owning some slots: `y[r] = x[src_slot[r] // k]`.

Slot `s` belongs to token `s // k`. The backward pass sums each token's slot gradients with
gathers only.

Args:
  x_TxD: token rows.
  src_slot_R: int32 slot (in [0, T * k)) of each output row.
  slot_to_row_M: int32 output row of each of the `T * k` slots (>= R: the slot has none).
  k: slots per token (static).
"""
