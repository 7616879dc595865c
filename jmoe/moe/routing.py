"""Routing functions: pure functions from router logits to a `Routing` (the math of each is in
docs/algorithms.md; the router objects of `jmoe.moe.routers` call them).

Every router returns the same `Routing` pytree, so dispatch, losses and the MoE layer never branch
on the router kind. Router math is float32 whatever the activation dtype.
Ties between equal scores go to the lower expert index (`jax.lax.top_k`'s rule).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.kernels import GROUP_SCORES, check_groups

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
      choices: `[T, K]` int32 raw picks over all `E_all` experts, null experts included (set by
        `null_experts`, whose unused slots otherwise hide which null expert was picked; None for
        the other routers).
    """

    expert_ids: jax.Array
    weights: jax.Array
    valid: jax.Array
    probs: jax.Array
    logits: jax.Array
    choices: jax.Array | None = None

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


def _group_limited(
    sel_TxE: jax.Array, n_groups: int, top_groups: int, group_score: str
) -> jax.Array:
    """Masks experts outside each token's `top_groups` best groups to -inf (DeepSeek-V2/V3).

    A group's score is the sum of its two best selection scores ("top2_sum", DeepSeek-V3) or its
    best one ("max", DeepSeek-V2); ties between groups go to the lower group index.
    """
    t, e = sel_TxE.shape
    sel_TxGxM = sel_TxE.reshape(t, n_groups, e // n_groups)
    group_score_TxG = jax.lax.top_k(sel_TxGxM, GROUP_SCORES[group_score])[0].sum(-1)
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
    group_score: str = "top2_sum",
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
        scores (docs/algorithms.md, "Auxiliary-loss-free bias balancing").
      n_groups, top_groups: group-limited selection: experts split into `n_groups` equal groups,
        only the `top_groups` best groups of each token are eligible (others masked to -inf).
      group_score: how a group is scored from its members' selection scores (biased, when
        `bias` is set): "top2_sum", the sum of its two best (DeepSeek-V3, whatever k), or "max",
        its best (DeepSeek-V2).
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
    check_groups(num_experts, k, n_groups, top_groups, group_score)
    if n_groups is not None:
        selection = _group_limited(selection, n_groups, top_groups, group_score)
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


def null_experts(
    logits: jax.Array,
    k: int,
    *,
    num_null: int,
    null_offset: float | jax.Array = 0.0,
) -> Routing:
    """AdaMoE null-expert routing (docs/algorithms.md, "Null experts (AdaMoE)").

    The last `num_null` columns of `logits` are null experts: zero output, zero FLOPs. Softmax and
    top-k run over all `E + num_null` experts; null picks become unused slots (expert id `E`,
    weight 0, not valid) and the weights are renormalised among the chosen true experts. A token
    that picks only null experts gets all-zero weights (its MoE output is exactly 0).

    Args:
      logits: `[T, E + num_null]` router logits (cast to float32).
      k: slots per token, counting true and null picks.
      num_null: null experts M >= 0.
      null_offset: added to the null logits for selection only (the compute-budget controller's
        knob: larger -> more null picks). The weights do not depend on it.

    Returns:
      A `Routing` with `K = k` slots; `probs` is the softmax over all `E + num_null` experts.

    Example:
      >>> r = null_experts(jnp.log(jnp.array([[0.4, 0.1, 0.3, 0.2]])), 2, num_null=2)
      >>> r.expert_ids.tolist(), r.weights.tolist()
      ([[0, 2]], [[1.0, 0.0]])
    """
    logits = logits.astype(jnp.float32)
    e_all = logits.shape[-1]
    num_experts = e_all - num_null
    if num_null < 0 or num_experts < 1:
        raise ValueError(f"null_experts: num_null={num_null} must be in [0, {e_all - 1}]")
    if not 1 <= k <= e_all:
        raise ValueError(f"null_experts: k={k} must be in [1, E + num_null={e_all}]")
    probs = jax.nn.softmax(logits, axis=-1)
    is_null_E = jnp.arange(e_all) >= num_experts
    selection = logits + jnp.where(is_null_E, jax.lax.stop_gradient(null_offset), 0.0)
    _, choice = jax.lax.top_k(selection, k)
    valid = choice < num_experts
    picked = jnp.where(valid, jnp.take_along_axis(probs, choice, axis=-1), 0.0)
    total = picked.sum(-1, keepdims=True)
    weights = picked / jnp.where(total > 0, total, 1.0)
    return Routing(
        expert_ids=jnp.where(valid, choice, num_experts).astype(jnp.int32),
        weights=weights,
        valid=valid,
        probs=probs,
        logits=logits,
        choices=choice.astype(jnp.int32),
    )


TOP_P_BOUNDARIES = ("strict", "inclusive")


def _concrete(value) -> bool:
    """True when `value` is known at trace time (not a tracer), so it can be checked."""
    try:
        float(value)
    except jax.errors.ConcretizationTypeError:
        return False
    return True


def top_p(
    logits: jax.Array,
    p: float | jax.Array,
    *,
    max_k: int | None = None,
    boundary: str = "strict",
) -> Routing:
    """Dynamic top-p routing, "Harder Tasks Need More Experts" (docs/algorithms.md).

    Experts are taken in descending softmax probability (ties: lower index first) until the
    cumulative probability first exceeds `p` ("strict", the official rule) or reaches it
    ("inclusive"); at least one expert is always kept, and all of them if no prefix passes `p`.
    Weights are the raw probabilities, not renormalised.

    Args:
      logits: `[T, E]` router logits (cast to float32).
      p: threshold in (0, 1] (a traced scalar is fine: the budget controller moves it).
      max_k: optional cap on experts per token (a non-paper extension); `K = max_k or E`.
      boundary: "strict" (cumulative > p) or "inclusive" (cumulative >= p).

    Returns:
      A `Routing` with `K = max_k or E` slots, the chosen experts first.

    Example:
      >>> r = top_p(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), 0.6)
      >>> r.valid.tolist(), r.weights.tolist()[0][:2]
      ([[True, True, False, False]], [0.5, 0.30000001192092896])
    """
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    if _concrete(p) and not 0 < float(p) <= 1:
        raise ValueError(f"top_p: p={p} must be in (0, 1]")
    k = num_experts if max_k is None else max_k
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_p: max_k={max_k} must be in [1, num_experts={num_experts}]")
    if boundary not in TOP_P_BOUNDARIES:
        raise ValueError(f"top_p: boundary={boundary!r} is not one of {TOP_P_BOUNDARIES}")
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p, order = jax.lax.top_k(probs, num_experts)
    cum = jnp.cumsum(sorted_p, axis=-1)
    before = jnp.pad(cum[:, :-1], ((0, 0), (1, 0)))  # mass of the higher-ranked experts
    keep = before <= p if boundary == "strict" else before < p
    keep = (keep | (p >= 1.0))[:, :k]  # no prefix passes p >= 1: keep all (also past rounding)
    return Routing(
        expert_ids=jnp.where(keep, order[:, :k], num_experts).astype(jnp.int32),
        weights=jnp.where(keep, sorted_p[:, :k], 0.0),
        valid=keep,
        probs=probs,
        logits=logits,
    )


def expert_choice(logits: jax.Array, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022; docs/algorithms.md): experts pick tokens.

    Each expert takes the `capacity` tokens with the highest softmax probability for it (ties:
    lower token index first); the weight is that probability. A token may get no expert or many.
    Not causal: a token's experts depend on the other tokens of the batch.

    Args:
      logits: `[T, E]` router logits (cast to float32).
      capacity: tokens per expert, in [0, T].

    Returns:
      A `Routing` with `K = E` slots: slot e is expert e, valid where e chose the token.
    """
    logits = logits.astype(jnp.float32)
    t, num_experts = logits.shape
    if not 0 <= capacity <= t:
        raise ValueError(f"expert_choice: capacity={capacity} must be in [0, tokens={t}]")
    probs = jax.nn.softmax(logits, axis=-1)
    _, tokens_ExC = jax.lax.top_k(probs.T, capacity)
    chosen_ExT = (
        jnp.zeros((num_experts, t), bool).at[jnp.arange(num_experts)[:, None], tokens_ExC].set(True)
    )
    valid = chosen_ExT.T
    return Routing(
        expert_ids=jnp.where(valid, jnp.arange(num_experts), num_experts).astype(jnp.int32),
        weights=jnp.where(valid, probs, 0.0),
        valid=valid,
        probs=probs,
        logits=logits,
    )
