"""Routers: pure functions from router logits to a `Routing`.

Every router returns the same `Routing` pytree, so dispatch, losses and the MoE layer never branch
on the router kind. Router math is float32 whatever the activation dtype (ALGORITHMS.md §0).
Ties between equal scores go to the lower expert index (`jax.lax.top_k`'s rule).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCORES = ("softmax", "sigmoid")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """The decision of a router for `T` tokens and `K` slots per token.

    Attributes:
      expert_ids: `[T, K]` int32 chosen expert per slot; an unused slot holds `num_experts`, a
        bucket that is never computed.
      weights: `[T, K]` float32 combine weight per slot; exactly 0 where `valid` is False.
      valid: `[T, K]` bool, the slot is a real expert computation.
      probs: `[T, E_all]` float32 scores the router used (softmax or sigmoid).
      logits: `[T, E_all]` float32 raw router logits.
    """

    expert_ids: jax.Array
    weights: jax.Array
    valid: jax.Array
    probs: jax.Array
    logits: jax.Array

    @property
    def num_slots(self) -> int:
        return self.expert_ids.shape[1]


def scores(logits_TxE: jax.Array, score: str) -> jax.Array:
    """Softmax or sigmoid router scores in float32."""
    logits_TxE = logits_TxE.astype(jnp.float32)
    if score == "softmax":
        return jax.nn.softmax(logits_TxE, axis=-1)
    if score == "sigmoid":
        return jax.nn.sigmoid(logits_TxE)
    raise ValueError(f"score={score!r} is not a router score; use one of {SCORES}")


def _group_limited(sel_TxE: jax.Array, k: int, n_groups: int, top_groups: int) -> jax.Array:
    """Masks experts outside each token's `top_groups` best groups to -inf (DeepSeek-V3).

    A group's score is the sum of its `max(1, k // top_groups)` best selection scores.
    """
    t, e = sel_TxE.shape
    sel_TxGxM = sel_TxE.reshape(t, n_groups, e // n_groups)
    per_group = max(1, k // top_groups)
    group_score_TxG = jax.lax.top_k(sel_TxGxM, per_group)[0].sum(-1)
    _, keep_TxH = jax.lax.top_k(group_score_TxG, top_groups)
    keep_TxG = jnp.zeros((t, n_groups), bool).at[jnp.arange(t)[:, None], keep_TxH].set(True)
    return jnp.where(keep_TxG[:, :, None], sel_TxGxM, -jnp.inf).reshape(t, e)


def top_k(
    logits: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    bias: jax.Array | None = None,
    n_groups: int | None = None,
    top_groups: int | None = None,
    renorm_when_k1: bool = False,
) -> Routing:
    """Token-choice top-k routing (Switch, Mixtral, Qwen, OLMoE, DeepSeek-V2/V3).

    Args:
      logits: `[T, E]` router logits (cast to float32).
      k: experts per token, `1 <= k <= E`.
      score: "softmax" over experts or elementwise "sigmoid".
      normalize: divide the k weights by their sum (only when k > 1 unless `renorm_when_k1`:
        renormalising a single weight makes it 1 and cuts the router's gradient).
      scale: multiplies the weights (DeepSeek `routed_scaling_factor`), after normalising.
      bias: optional `[E]` added to the scores for selection only; the weights use the unbiased
        scores (auxiliary-loss-free balancing, ALGORITHMS.md §5.3).
      n_groups, top_groups: group-limited selection: experts split into `n_groups` equal groups,
        only the `top_groups` best groups of each token are eligible (others masked to -inf).
      renorm_when_k1: renormalise even when k == 1 (HF Mixtral/Qwen parity).

    Returns:
      A `Routing` with `K = k` slots, all valid, in descending selection-score order.

    Example:
      >>> r = top_k(jnp.array([[2.0, 1.0, 0.0]]), 2, normalize=True)
      >>> r.expert_ids.tolist()
      [[0, 1]]
    """
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k: k={k} must be in [1, num_experts={num_experts}]")
    probs = scores(logits, score)
    selection = probs if bias is None else probs + jax.lax.stop_gradient(bias).astype(jnp.float32)
    if n_groups is not None or top_groups is not None:
        _check_groups(num_experts, k, n_groups, top_groups)
        selection = _group_limited(selection, k, n_groups, top_groups)
    _, expert_ids = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(probs, expert_ids, axis=-1)
    if normalize and (k > 1 or renorm_when_k1):
        weights = weights / weights.sum(-1, keepdims=True)
    weights = weights * scale
    return Routing(
        expert_ids=expert_ids.astype(jnp.int32),
        weights=weights,
        valid=jnp.ones(expert_ids.shape, bool),
        probs=probs,
        logits=logits,
    )


def _check_groups(num_experts: int, k: int, n_groups: int | None, top_groups: int | None):
    if n_groups is None or top_groups is None:
        raise ValueError(
            f"group-limited routing needs both n_groups and top_groups, got {n_groups=}, "
            f"{top_groups=}"
        )
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide num_experts={num_experts}")
    if not 1 <= top_groups <= n_groups:
        raise ValueError(f"top_groups={top_groups} must be in [1, n_groups={n_groups}]")
    if k > top_groups * (num_experts // n_groups):
        raise ValueError(
            f"k={k} exceeds the experts in top_groups={top_groups} groups of "
            f"{num_experts // n_groups}; raise top_groups or lower k"
        )
