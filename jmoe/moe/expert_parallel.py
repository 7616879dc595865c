"""Expert-parallel dispatch under `jax.shard_map`: all-to-all to the experts' devices and back.

Each device holds `T_l` tokens (the batch is split over `BATCH_AXES`) and `E_l = E / n` experts
(`n` the "expert" mesh axis size). Per device:
  1. sort its kept (token, slot) pairs by expert and lay them out as `n` chunks, one per
     destination device; unused slots (null experts, top-p cut-offs, capacity drops) take no row;
  2. `all_to_all` the chunks and the per-expert row counts over "expert";
  3. sort the received rows by local expert and run the grouped expert MLP (weights `[E_l, ...]`,
     hidden width split over "tensor" with a `psum`), rows past the counts cost nothing;
  4. `all_to_all` the results back and combine each token's slots with its weights.

A chunk holds the worst case: `T_l * min(K, E_l)` rows when dropless (a token picks an expert at
most once), `min(E_l * C_l, ...)` with a per-shard capacity `C_l`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jmoe import kernels
from jmoe.kernels.permute import gather_slots, permute_rows
from jmoe.moe import dispatch
from jmoe.moe.routing import Routing
from jmoe.sharding import BATCH_AXES, axis_size, batch_sharding, mesh_axes


def chunk_rows(num_tokens: int, k: int, experts_per_device: int, capacity: int | None) -> int:
    """Rows one device sends to another: the worst case of `num_tokens` local tokens."""
    rows = num_tokens * min(k, experts_per_device)
    return rows if capacity is None else min(rows, experts_per_device * capacity)


def local_capacity(
    capacity_fn, num_tokens: int, mesh: Mesh, deterministic: bool = True
) -> int | None:
    """Per-shard capacity: `capacity_fn(T / shards)`, the rule applied to each token shard."""
    return capacity_fn(num_tokens // axis_size(mesh, BATCH_AXES), deterministic)


def _send_layout(kept: Routing, num_experts: int, n: int, chunk: int):
    """Where each kept slot goes in the send buffer of `n` chunks (one per destination device) of
    `chunk` rows.

    Returns:
      src_slot_B: `[n * chunk]` slot of each buffer row (`T * K`: a padding row).
      slot_to_buf_M: `[T * K]` buffer row of each slot (`n * chunk`: the slot is not sent).
      counts_NxE: `[n, E_l]` rows sent to each device for each of its local experts.
    """
    plan = dispatch.make_plan(kept, num_experts)
    m = plan.slot_to_row.shape[0]
    # 1. Device j holds experts `[j * E_l, (j + 1) * E_l)`, so the slots sorted by expert id are
    #    also grouped by destination: device j's rows are the `counts_N[j]` sorted rows from
    #    `starts_N[j]`, already sorted by its local experts.
    counts_NxE = plan.group_sizes.reshape(n, -1)
    counts_N = counts_NxE.sum(1)
    starts_N = jnp.cumsum(counts_N) - counts_N
    # 2. Chunk j copies those rows in order, then pads: `chunk` is the worst case, so
    #    `counts_N[j] <= chunk`. Padding rows hold no slot (`m`); their sorted row is clipped only
    #    to keep the gather in bounds.
    r_C = jnp.arange(chunk, dtype=jnp.int32)
    fill_NxC = r_C < counts_N[:, None]
    row_NxC = jnp.minimum(starts_N[:, None] + r_C, m - 1)
    src_slot_B = jnp.where(fill_NxC, plan.sort_order[row_NxC], m).reshape(-1)
    # 3. The inverse map: a slot's buffer row is its chunk's first row `dest * chunk` plus its
    #    place among its destination's rows, `sorted row - starts_N[dest]`. Unused slots (expert
    #    `num_experts`, so `dest == n`) are not sent; `dest` is clipped only to index `starts_N`.
    ids_M = dispatch.slot_expert_ids(kept, num_experts).reshape(-1)
    dest_M = ids_M // (num_experts // n)
    sent_M = ids_M < num_experts
    pos_M = plan.slot_to_row - starts_N[jnp.minimum(dest_M, n - 1)]
    slot_to_buf_M = jnp.where(sent_M, dest_M * chunk + pos_M, n * chunk).astype(jnp.int32)
    return src_slot_B, slot_to_buf_M, counts_NxE


def _local_experts(recv_NxCxD, counts_NxE, w_in, w_down, b_in, b_down, scales, mlp_options, tensor):
    """Received rows -> sorted by local expert -> expert MLP -> received order.

    With one source (`n == 1`) the rows already arrive sorted by expert, padding last. Padding
    rows sort past the experts' rows, so no bias reaches them."""
    n, chunk, d = recv_NxCxD.shape
    x_BxD = recv_NxCxD.reshape(n * chunk, d)
    if n > 1:
        # 1. Source j's chunk holds `sum(counts_NxE[j])` rows sorted by local expert, then
        #    padding (`_send_layout`, step 1). Row r's local expert is the number of experts whose
        #    rows end at or before r (the cumulative counts); padding rows get E_l, past them all.
        cum_NxE = jnp.cumsum(counts_NxE, axis=1)
        r_C = jnp.arange(chunk, dtype=jnp.int32)
        ids_B = (r_C[None, :, None] >= cum_NxE[:, None, :]).sum(-1).reshape(-1)
        # 2. A stable sort by local expert brings each expert's rows from every source together
        #    (in source order), padding last, so the group sizes are the counts summed over the
        #    sources. The MLP's output goes back through the inverse permutation (step 3 below).
        by_expert = dispatch.sort_by_key(ids_B, counts_NxE.shape[1])
        x_BxD = permute_rows(x_BxD, by_expert.order, by_expert.inverse)
    if b_down is not None and tensor > 1:
        # Each "tensor" shard holds a slice of F and adds a partial down projection, summed by
        # the `psum` below: only the first shard adds the down bias, so it is added once.
        b_down = jnp.where(jax.lax.axis_index("tensor") == 0, b_down, 0).astype(b_down.dtype)
    y_BxD = kernels.expert_mlp(
        x_BxD,
        w_in,
        w_down,
        counts_NxE.sum(0),
        b_in=b_in,
        b_down_GxD=b_down,
        scales_in=scales[0],
        scale_down_GxD=scales[1],
        **mlp_options,
    )
    if tensor > 1:
        y_BxD = jax.lax.psum(y_BxD, "tensor")
    if n > 1:  # 3. back to the received order, for the reply all-to-all
        y_BxD = permute_rows(y_BxD, by_expert.inverse, by_expert.order)
    return y_BxD.reshape(n, chunk, d)


def expert_parallel_mlp(
    x_TxD: jax.Array,
    routed: Routing,
    w_in: tuple[jax.Array, ...],
    w_down_ExFxD: jax.Array,
    *,
    mesh: Mesh,
    capacity: int | None,
    b_in: tuple[jax.Array, ...] | None = None,
    b_down_ExD: jax.Array | None = None,
    scales_in: tuple[jax.Array, ...] | None = None,
    scale_down_ExD: jax.Array | None = None,
    **mlp_options,
) -> tuple[jax.Array, jax.Array]:
    """Routed expert MLPs with experts split over the "expert" mesh axis.

    Args:
      x_TxD: global tokens; split over `BATCH_AXES` (T must divide evenly).
      routed: the router's decision for the T tokens (`expert_ids`, `weights`, `valid` used).
      w_in: `(w_gate, w_up)` or `(w_up,)`, each `[E, D, F]`; `w_down_ExFxD` `[E, F, D]`.
      mesh: the device mesh; E must divide by its "expert" size, F by its "tensor" size.
      capacity: rows per expert per token shard (`local_capacity`), or None for dropless.
        Overflow is dropped per shard in position-priority order (`dispatch.apply_capacity`).
      b_in, b_down_ExD: optional expert biases (`[E, F]` each, `[E, D]`), split with their
        experts (and `b_in` over "tensor" with F).
      scales_in, scale_down_ExD: the column scales of quantized weights (`[E, F]` each, `[E, D]`),
        split like the biases (a down projection's partial sums over "tensor" are scaled before
        the `psum`, which is linear).
      **mlp_options: `activation`, `swiglu_alpha`, `swiglu_limit`, `implementation`, as in
        `jmoe.kernels.expert_mlp`.

    Returns:
      `y_TxD` (dtype of `x_TxD`) and the kept `valid` `[T, K]` (False where dropped or unused).
    """
    num_experts = w_down_ExFxD.shape[0]
    n, tensor = axis_size(mesh, "expert"), axis_size(mesh, "tensor")
    shards = axis_size(mesh, BATCH_AXES)
    t, k = routed.expert_ids.shape
    if num_experts % n:
        raise ValueError(
            f"num_experts={num_experts} is not a multiple of the mesh's expert axis ({n}): "
            "choose an expert axis size that divides the experts"
        )
    if t % shards:
        raise ValueError(
            f"tokens T={t} are not a multiple of the {shards} batch shards of mesh "
            f"{dict(mesh.shape)}: use a batch whose token count divides evenly"
        )
    if w_down_ExFxD.shape[1] % tensor:
        raise ValueError(f"d_ff={w_down_ExFxD.shape[1]} is not a multiple of tensor={tensor}")
    chunk = chunk_rows(t // shards, k, num_experts // n, capacity)

    b_in = tuple(b_in or ())
    b_down = () if b_down_ExD is None else (b_down_ExD,)  # () or one array: shard_map operands
    scales_in = tuple(scales_in or ())
    scale_down = () if scale_down_ExD is None else (scale_down_ExD,)

    def body(
        x_TxD, ids_TxK, weights_TxK, valid_TxK, w_in, w_down, b_in, b_down, scales_in, scale_down
    ):
        # probs / logits are not used by the capacity rule: the weights stand in for them
        kept = Routing(ids_TxK, weights_TxK, valid_TxK, probs=weights_TxK, logits=weights_TxK)
        if capacity is not None:
            kept, _ = dispatch.apply_capacity(kept, num_experts, capacity)
        src_slot_B, slot_to_buf_M, counts_NxE = _send_layout(kept, num_experts, n, chunk)
        m = slot_to_buf_M.shape[0]
        send_BxD = gather_slots(x_TxD, jnp.minimum(src_slot_B, m - 1), slot_to_buf_M, k)
        send_BxD = jnp.where((src_slot_B < m)[:, None], send_BxD, 0)
        send_NxCxD = send_BxD.reshape(n, chunk, -1)
        if n > 1:
            recv = jax.lax.all_to_all(send_NxCxD, "expert", 0, 0, tiled=True)
            counts_NxE = jax.lax.all_to_all(counts_NxE, "expert", 0, 0, tiled=True)
        else:
            recv = send_NxCxD
        biases = (b_in or None, b_down[0] if b_down else None)
        scales = (scales_in or None, scale_down[0] if scale_down else None)
        y_NxCxD = _local_experts(
            recv, counts_NxE, w_in, w_down, *biases, scales, mlp_options, tensor
        )
        if n > 1:
            y_NxCxD = jax.lax.all_to_all(y_NxCxD, "expert", 0, 0, tiled=True)
        plan = dispatch.DispatchPlan(src_slot_B, slot_to_buf_M, counts_NxE.reshape(-1))
        y_TxD = dispatch.combine(y_NxCxD.reshape(n * chunk, -1), plan, kept.weights)
        return y_TxD, kept.valid

    tokens = batch_sharding(mesh).spec
    expert, hidden = (mesh_axes(mesh, (axis,)) or None for axis in ("expert", "tensor"))
    w_in_spec = P(expert, None, hidden)
    weight_specs = (
        (w_in_spec,) * len(w_in),
        P(expert, hidden),
        (P(expert, hidden),) * len(b_in),
        (P(expert, None),) * len(b_down),
        (P(expert, hidden),) * len(scales_in),
        (P(expert, None),) * len(scale_down),
    )
    y_TxD, kept_valid = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, *weight_specs),
        out_specs=(tokens, tokens),
        check_vma=False,  # the grouped matmul's loop carries are not typed per mesh axis
    )(
        x_TxD,
        routed.expert_ids,
        routed.weights,
        routed.valid,
        tuple(w_in),
        w_down_ExFxD,
        b_in,
        b_down,
        scales_in,
        scale_down,
    )
    return y_TxD, kept_valid
