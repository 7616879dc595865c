"""Plain jax.numpy references for every kernel: the test oracle (one group / row at a time).

They favour obviousness over speed: each group is a dense matmul of its rows masked out of `x`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import GROUP_SCORES


def _group_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """`[m]` int32 group of each row; `G` for rows past `sum(group_sizes)`."""
    ends = jnp.cumsum(jnp.asarray(group_sizes, jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m), side="right").astype(jnp.int32)


def gmm(lhs_MxK, rhs_LxKxN, group_sizes, *, group_offset=0, transpose_rhs=False):
    """`y[r] = lhs[r] @ rhs[g - group_offset]` (`.T` if `transpose_rhs`), zeros elsewhere."""
    if transpose_rhs:
        rhs_LxKxN = jnp.swapaxes(rhs_LxKxN, 1, 2)
    group_M = _group_of_rows(group_sizes, lhs_MxK.shape[0]) - group_offset
    y = jnp.zeros((lhs_MxK.shape[0], rhs_LxKxN.shape[2]), jnp.float32)
    for g in range(rhs_LxKxN.shape[0]):
        rows = (group_M == g)[:, None]
        y += jnp.where(rows, jnp.dot(lhs_MxK, rhs_LxKxN[g], preferred_element_type=jnp.float32), 0)
    return y.astype(lhs_MxK.dtype)


def tgmm(lhs_MxK, rhs_MxN, group_sizes, *, num_local=None, group_offset=0):
    """`out[g] = lhs[rows of g + group_offset].T @ rhs[same rows]`, `[L, K, N]`."""
    num_local = len(group_sizes) if num_local is None else num_local
    group_M = _group_of_rows(group_sizes, lhs_MxK.shape[0]) - group_offset
    outs = [
        jnp.dot(
            jnp.where((group_M == g)[:, None], lhs_MxK, 0).T,
            rhs_MxN,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        for g in range(num_local)
    ]
    return jnp.stack(outs).astype(lhs_MxK.dtype)


def swiglu(x_MxD, w_gate, w_up, group_sizes, *, group_offset=0):
    """`silu(x @ w_gate[g]) * (x @ w_up[g])` with float32 pre-activations."""
    up = lambda w: gmm(x_MxD.astype(jnp.float32), w.astype(jnp.float32), group_sizes,  # noqa: E731
                       group_offset=group_offset)  # fmt: skip
    return (jax.nn.silu(up(w_gate)) * up(w_up)).astype(x_MxD.dtype)


def top_k_ids(selection_TxE, k, n_groups=None, top_groups=None, group_score="top2_sum"):
    """`[T, k]` int32 ids of the k best selection scores (lowest index wins ties); with
    `n_groups`, only among the `top_groups` groups with the largest sums of their two best
    ("top2_sum") or their best ("max") scores."""
    if n_groups is not None:
        t, e = selection_TxE.shape
        grouped = selection_TxE.reshape(t, n_groups, e // n_groups)
        group_scores = jax.lax.top_k(grouped, GROUP_SCORES[group_score])[0].sum(-1)
        kept = jax.lax.top_k(group_scores, top_groups)[1]
        keep = jnp.zeros((t, n_groups), bool).at[jnp.arange(t)[:, None], kept].set(True)
        selection_TxE = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
    return jax.lax.top_k(selection_TxE, k)[1].astype(jnp.int32)


def top_k_gating(x_TxD, w_DxE, k, *, score="softmax", bias=None, normalize=False, scale=1.0,
                 n_groups=None, top_groups=None, group_score="top2_sum",
                 renorm_when_k1=False):  # fmt: skip
    """Router logits, scores, `top_k_ids` of the (biased) scores and per-expert counts.

    Returns:
      `(ids [T, k] int32, weights [T, k] f32, counts [E] int32, probs [T, E] f32, logits [T, E])`.
    """
    logits = jnp.dot(x_TxD, w_DxE, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, -1) if score == "softmax" else jax.nn.sigmoid(logits)
    selection = probs if bias is None else probs + bias.astype(jnp.float32)
    ids = top_k_ids(selection, k, n_groups, top_groups, group_score)
    weights = jnp.take_along_axis(probs, ids, -1)
    if normalize and (k > 1 or renorm_when_k1):
        weights = weights / weights.sum(-1, keepdims=True)
    counts = jnp.zeros(w_DxE.shape[1], jnp.int32).at[ids.reshape(-1)].add(1)
    return ids, weights * scale, counts, probs, logits
