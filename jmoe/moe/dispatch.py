"""Dispatch: (token, slot) pairs to rows sorted by expert, and back (docs/algorithms.md, "Dispatch
and capacity").

Dropless dispatch sorts every slot by its expert id; unused slots (id = `num_experts`) sort to a
trailing bucket that the grouped matmul never computes. Capacity-bounded dispatch first marks the
slots that overflow an expert's capacity as unused (all tokens' first choices are queued before any
second choice) and then dispatches the rest the same way, so only kept slots cost compute.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmoe.kernels.permute import gather_slots, permute_rows
from jmoe.moe.routing import Routing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """How `M = T * K` slots are laid out as `R <= M` rows sorted by expert.

    Attributes:
      sort_order: `[R]` int32 slot (`t * K + k`) held by each sorted row.
      slot_to_row: `[M]` int32 sorted row of each slot (`>= R`: the slot has no row).
      group_sizes: `[E]` int32 rows per expert; rows past their sum are unused slots.
    """

    sort_order: jax.Array
    slot_to_row: jax.Array
    group_sizes: jax.Array


class KeySort(NamedTuple):
    """A stable sort of small integer keys (`sort_by_key`).

    Attributes:
      order: `[M]` int32 element at each sorted position.
      inverse: `[M]` int32 sorted position of each element (`order[inverse[m]] == m`).
      rank: `[M]` int32 place of each element among those with its key, in input order.
      counts: `[num_keys + 1]` int32 elements per key.
    """

    order: jax.Array
    inverse: jax.Array
    rank: jax.Array
    counts: jax.Array


def sort_by_key(keys_M: jax.Array, num_keys: int) -> KeySort:
    """Stable sort of int keys in `[0, num_keys]` (`num_keys`: the unused-slot bucket), with each
    element's sorted position and its rank within its key."""
    # 1. A stable argsort keeps equal keys in input order: the rows of one expert stay in token
    #    order, and the capacity queue in position-priority order (`apply_capacity`).
    order_M = jnp.argsort(keys_M, stable=True).astype(jnp.int32)
    m = keys_M.shape[0]
    # 2. `order` is a permutation; writing each sorted position at its element inverts it.
    inverse_M = jnp.zeros((m,), jnp.int32).at[order_M].set(jnp.arange(m, dtype=jnp.int32))
    # 3. Sorted, key `e` fills the positions `[starts[e], starts[e] + counts[e])`, `starts` being
    #    the exclusive prefix sum of the counts.
    counts = jnp.bincount(keys_M, length=num_keys + 1).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    # 4. So an element's rank within its key is its sorted position minus its key's start: by 1,
    #    the number of elements before it in the input with the same key.
    rank_M = inverse_M - starts[keys_M]
    return KeySort(order_M, inverse_M, rank_M, counts)


def slot_expert_ids(routing: Routing, num_experts: int) -> jax.Array:
    """`[T, K]` int32 expert of each slot, `num_experts` (the bucket no expert computes) for each
    unused slot."""
    return jnp.where(routing.valid, routing.expert_ids, num_experts).astype(jnp.int32)


def make_plan(routing: Routing, num_experts: int, max_rows: int | None = None) -> DispatchPlan:
    """Sorts the valid slots of `routing` by expert (stable: token order within an expert).

    Args:
      routing: the (possibly capacity-bounded) routing of `T` tokens over `K` slots.
      num_experts: E.
      max_rows: keep only the first `R = min(T * K, max_rows)` sorted rows; the caller guarantees
        at most R valid slots (e.g. `E * capacity`), so fewer rows are gathered and carried.
    """
    ids_M = slot_expert_ids(routing, num_experts).reshape(-1)
    by_expert = sort_by_key(ids_M, num_experts)
    m = ids_M.shape[0]
    rows = m if max_rows is None else min(m, max_rows)
    # Unused slots sort last (key `num_experts`): the kept rows are the sort's first `rows`, and
    # the unused bucket's count is not a group.
    return DispatchPlan(
        sort_order=by_expert.order[:rows],
        slot_to_row=by_expert.inverse,
        group_sizes=by_expert.counts[:-1],
    )


def permute(x_TxD: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Token rows to slot rows sorted by expert: `[T, D] -> [R, D]`."""
    if x_TxD.shape[0] == 0:  # no tokens, no slots
        return jnp.zeros((plan.sort_order.shape[0], x_TxD.shape[1]), x_TxD.dtype)
    k = plan.slot_to_row.shape[0] // x_TxD.shape[0]
    return gather_slots(x_TxD, plan.sort_order, plan.slot_to_row, k)


def combine(y_RxD: jax.Array, plan: DispatchPlan, weights_TxK: jax.Array) -> jax.Array:
    """Weighted sum of each token's slot rows back to tokens: `[R, D] -> [T, D]`.

    Accumulates in float32 and returns `y_RxD.dtype`; slots with weight 0 add nothing.
    """
    t, k = weights_TxK.shape
    y_MxD = permute_rows(y_RxD, plan.slot_to_row, plan.sort_order)
    y_TxKxD = y_MxD.reshape(t, k, y_RxD.shape[-1])
    y_TxD = jnp.einsum(
        "tkd,tk->td", y_TxKxD, weights_TxK.astype(y_RxD.dtype), preferred_element_type=jnp.float32
    )
    return y_TxD.astype(y_RxD.dtype)


def apply_capacity(routing: Routing, num_experts: int, capacity: int) -> tuple[Routing, jax.Array]:
    """Drops the slots that overflow `capacity` rows per expert.

    Position priority (GShard / Switch): every token's first choice is queued, in token order,
    before any token's second choice, and so on. A dropped slot becomes unused (expert id
    `num_experts`, weight 0, not valid); kept weights are not renormalised.

    Args:
      routing: the router's decision over `[T, K]` slots.
      num_experts: E.
      capacity: rows each expert may take, >= 0.

    Returns:
      The routing with dropped slots removed, and the dropped fraction of the valid slots.
    """
    ids_TxK = slot_expert_ids(routing, num_experts)
    t, k = ids_TxK.shape
    # 1. Position priority queues slot (t, j) before (t', j') when j < j', or j == j' and t < t':
    #    exactly the order of the transposed ids flattened, `[K, T] -> [K * T]`.
    # 2. The stable sort by expert keeps that order within each expert, so a slot's rank is the
    #    number of slots queued ahead of it at its expert.
    # 3. A slot is kept when fewer than `capacity` are ahead of it. Unused slots rank within the
    #    bucket `num_experts` and stay dropped (they are not valid).
    rank_KT = sort_by_key(ids_TxK.T.reshape(-1), num_experts).rank
    keep_TxK = routing.valid & (rank_KT.reshape(k, t).T < capacity)
    num_valid = routing.valid.sum()
    dropped = (num_valid - keep_TxK.sum()) / jnp.maximum(num_valid, 1)
    kept = dataclasses.replace(
        routing,
        expert_ids=jnp.where(keep_TxK, routing.expert_ids, num_experts).astype(jnp.int32),
        weights=jnp.where(keep_TxK, routing.weights, 0.0),
        valid=keep_TxK,
    )
    return kept, dropped.astype(jnp.float32)
