"""Merging each MoE layer's experts into fewer, guided by the router (MC-SMoE's merge step,
"Merge, then Compress", Li et al., ICLR 2024).

On calibration tokens, every MoE layer is merged the same way:
1. usage: each expert's share of the layer's routed assignments (`expert_usage`; all chain
   steps, padding left out);
2. grouping: the `num_groups` most used experts become "dominant" experts, and every other
   expert joins the dominant expert whose router logits over the calibration tokens are most
   similar (cosine; `logit_similarity`, `group_experts`);
3. alignment: each member's hidden units (the F axis) are permuted to match its dominant
   expert's by weight matching (`match_hidden_units`), which leaves the member's function
   unchanged;
4. merging: the group's aligned weights and biases are averaged with the members' usage as
   weights, and so are its router columns, logit biases and selection biases (`merge_layer`).

The result is an ordinary model of `num_groups` experts per MoE layer (`merge_experts`). The
paper may leave different layers different expert counts (dominant experts chosen by usage over
all layers at once); a jmoe model has one `MoEConfig`, so every MoE layer keeps `num_groups`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jmoe.compress import surgery, trace
from jmoe.lm.config import ModelConfig
from jmoe.moe.routing import Routing

# The hidden (F) axis of each expert parameter, per expert (the leading E axis removed):
# `w_gate` / `w_up` `[D, F]`, `w_down` `[F, D]`, `b_gate` / `b_up` `[F]`; `b_down` `[D]` has none.
HIDDEN_AXIS = {"w_gate": 1, "w_up": 1, "w_down": 0, "b_gate": 0, "b_up": 0, "b_down": None}

_EPS = 1e-12


def merge_experts(
    config: ModelConfig,
    variables: dict,
    tokens_BxS,
    mask_BxS,
    num_groups: int,
    *,
    align: bool = True,
) -> tuple[ModelConfig, dict]:
    """The model with each MoE layer's E experts merged into `num_groups` (module docstring).

    Args:
      config, variables: the model (either layer layout; float experts, not quantized ones).
      tokens_BxS: int calibration token ids.
      mask_BxS: bool, False for padding (None: every token counts).
      num_groups: experts per MoE layer after merging, in `[1, E]` and enough for the router
        (a top-k router needs at least k).
      align: permute each member's hidden units to its dominant expert's before averaging
        (False: average them as they are, the ablation of step 3).

    Returns:
      `(config, variables)` of an ordinary model with `moe.num_experts = num_groups`; merged
      expert g of a layer comes from the group of its g-th dominant expert in index order, so
      `num_groups = E` returns the model unchanged.

    Raises:
      ValueError: `num_groups` outside `[1, E]` or too few for the router, no calibration
        token left by the mask, or expert parameters this module does not know (quantized).
    """
    _check_num_groups(config, num_groups)
    mask_T = np.ones(np.size(tokens_BxS), bool)
    if mask_BxS is not None:
        mask_T = np.asarray(mask_BxS, bool).reshape(-1)
    if mask_T.shape != (np.size(tokens_BxS),) or not mask_T.any():
        raise ValueError(
            f"merge_experts: mask_BxS must have the shape of tokens_BxS {np.shape(tokens_BxS)} "
            "and keep at least one calibration token"
        )
    routings = trace.layer_routings(config, variables, tokens_BxS, mask_BxS)
    num_experts = config.moe.num_experts
    layers = []
    for weights in surgery.moe_layer_weights(config, variables):
        steps = routings[weights.layer]
        usage_E = expert_usage(steps, mask_T, num_experts)
        similarity_ExE = logit_similarity(steps, mask_T, num_experts)
        groups = group_experts(usage_E, similarity_ExE, num_groups)
        layers.append(merge_layer(weights, groups, usage_E, align=align))
    return surgery.with_experts(config, variables, layers)


def merge_method(num_groups: int, *, align: bool = True) -> Callable:
    """`merge_experts` as a compression method `(config, variables, context) -> (config,
    variables)`, where `context` has the calibration `tokens_BxS` and `mask_BxS`."""

    def method(config: ModelConfig, variables: dict, context) -> tuple[ModelConfig, dict]:
        return merge_experts(
            config, variables, context.tokens_BxS, context.mask_BxS, num_groups, align=align
        )

    return method


def expert_usage(routings: Sequence[Routing], mask_T, num_experts: int) -> np.ndarray:
    """Each true expert's share of the routed assignments `[E]` (float64, summing to 1, or all
    0 when nothing was routed): valid slots of unmasked tokens, over all chain steps."""
    counts_E = np.zeros(num_experts, np.float64)
    mask_T = np.asarray(mask_T, bool)
    for routing in routings:
        ids_TxK = np.asarray(routing.expert_ids)
        # 1. Unused slots hold the bucket id E and are not valid; padding rows are masked out.
        keep_TxK = np.asarray(routing.valid, bool) & mask_T[:, None]
        counts_E += np.bincount(ids_TxK[keep_TxK], minlength=num_experts)[:num_experts]
    total = counts_E.sum()
    return counts_E / total if total > 0 else counts_E


def logit_similarity(routings: Sequence[Routing], mask_T, num_experts: int) -> np.ndarray:
    """Cosine similarity `[E, E]` of the true experts' router-logit columns over the unmasked
    tokens of every chain step (null-expert columns left out)."""
    mask_T = np.asarray(mask_T, bool)
    logits_NxE = np.concatenate(
        [np.asarray(r.logits, np.float64)[mask_T, :num_experts] for r in routings]
    )
    unit_NxE = logits_NxE / np.maximum(np.linalg.norm(logits_NxE, axis=0), _EPS)
    return unit_NxE.T @ unit_NxE


def group_experts(usage_E, similarity_ExE, num_groups: int) -> list[list[int]]:
    """MC-SMoE grouping: the `num_groups` most used experts are dominant (ties: lower index);
    every other expert joins the dominant expert it is most similar to (ties: the lower
    dominant index).

    Returns:
      One group per dominant expert, in dominant index order; each group lists its dominant
      expert first, then its members in index order.
    """
    usage_E = np.asarray(usage_E)
    similarity_ExE = np.asarray(similarity_ExE)
    num_experts = usage_E.shape[0]
    if not 1 <= num_groups <= num_experts or similarity_ExE.shape != (num_experts,) * 2:
        raise ValueError(
            f"group_experts: need 1 <= num_groups={num_groups} <= E={num_experts} and an "
            f"[E, E] similarity, got {similarity_ExE.shape}"
        )
    dominant_G = np.sort(np.argsort(-usage_E, kind="stable")[:num_groups])
    groups = [[int(d)] for d in dominant_G]
    for expert in range(num_experts):
        if expert not in dominant_G:
            # 1. argmax takes the first of equal similarities: the lowest dominant index.
            groups[int(np.argmax(similarity_ExE[expert, dominant_G]))].append(expert)
    return groups


def match_hidden_units(dominant: dict, member: dict) -> np.ndarray:
    """The permutation `perm_F` of `member`'s hidden units that best matches `dominant`'s:
    unit `perm_F[f]` of the member goes to place f (`permute_hidden_units`).

    Weight matching: each hidden unit is the vector of all its weights (its `w_gate` / `w_up`
    column, its `w_down` row, its biases); the permutation maximising the summed inner products
    of matched units is a linear assignment problem, solved exactly.

    Args:
      dominant, member: one expert's parameters each, `{name: per-expert array}` (no E axis).
    """
    similarity_FxF = sum(
        _units(name, dominant[name]) @ _units(name, member[name]).T
        for name in dominant
        if _hidden_axis(name) is not None
    )
    _, perm_F = linear_sum_assignment(similarity_FxF, maximize=True)
    return perm_F


def permute_hidden_units(expert: dict, perm_F) -> dict:
    """One expert's parameters with hidden unit `perm_F[f]` moved to place f (the expert's
    function is unchanged)."""
    return {
        name: a if (axis := _hidden_axis(name)) is None else np.take(a, perm_F, axis=axis)
        for name, a in expert.items()
    }


def merge_layer(
    weights: surgery.MoELayerWeights,
    groups: Sequence[Sequence[int]],
    usage_E,
    *,
    align: bool = True,
) -> surgery.MoELayerWeights:
    """The layer with one expert per group (in the order given): the usage-weighted average of
    the group's experts, each member aligned to the group's first (dominant) expert (unless
    `align` is False).

    A group's merging weights are its experts' usage divided by their sum (equal weights when
    the group was never used). The merged expert's router column is the same average of the
    group's router columns, and so are its logit bias (`router/bias`) and top-k selection bias
    (`moe_state/bias`, one per chain step): the router column is merged like the expert's other
    weights, with the most used members counting most, rather than kept from the dominant
    expert alone. Null-expert columns are kept unchanged. Since the logits are linear in the
    column and bias, this rule keeps, on every token:
    - the merged expert's logit equal to the usage-weighted mean of its members' logits, so a
      group of experts with identical columns keeps its exact logit (and its sigmoid score);
    - the logits of the other groups and of the null experts.
    It does not keep a softmax router's normaliser: the members' probability mass leaves the
    denominator, so softmax scores of the remaining experts grow. Nor can it keep the routing of
    a top-k with k >= 2 that filled several slots of a token with one group's members: the merged
    model gives those slots to other groups.
    """
    params = weights.params
    experts = params["experts"]
    for name in experts:
        _hidden_axis(name)  # unknown (quantized) parameters fail before any work
    num_experts = next(iter(experts.values())).shape[0]
    if sorted(e for group in groups for e in group) != list(range(num_experts)) or not all(groups):
        raise ValueError(
            f"merge_layer: groups {[list(g) for g in groups]} must be non-empty and hold each "
            f"expert of [0, {num_experts}) once"
        )
    usage_E = np.asarray(usage_E, np.float64)
    router = params["router"]
    num_outputs = router["kernel"].shape[-1]
    # 1. mix[i, g] is expert i's merging weight in group g; null-expert columns map to themselves,
    #    after the groups: a column block `columns @ mix` merges every router array at once.
    mix = np.zeros((num_outputs, len(groups) + num_outputs - num_experts))
    mix[num_experts:, len(groups) :] = np.eye(num_outputs - num_experts)
    merged = {name: [] for name in experts}
    for g, group in enumerate(groups):
        group = list(group)
        total = usage_E[group].sum()
        w_M = usage_E[group] / total if total > 0 else np.full(len(group), 1.0 / len(group))
        mix[group, g] = w_M
        dominant = _expert(experts, group[0])
        sums = {name: w_M[0] * a for name, a in dominant.items()}
        for member, w in zip(group[1:], w_M[1:], strict=True):
            expert = _expert(experts, member)
            if align:
                expert = permute_hidden_units(expert, match_hidden_units(dominant, expert))
            sums = {name: s + w * expert[name] for name, s in sums.items()}
        for name, s in sums.items():
            merged[name].append(s)
    new_params = {
        **params,
        "router": {name: _mix(a, mix) for name, a in router.items()},
        "experts": {
            name: jnp.asarray(np.stack(merged[name]), params["experts"][name].dtype)
            for name in experts
        },
    }
    state = {
        name: _mix(a, mix[:num_experts, : len(groups)]) if name == "bias" else a
        for name, a in weights.state.items()
    }
    return dataclasses.replace(weights, params=new_params, state=state)


def _expert(experts: dict, index: int) -> dict[str, np.ndarray]:
    """One expert's parameters in float32 (one expert at a time: a layer's experts in float
    could be larger than the host memory)."""
    return {name: np.asarray(a[index], np.float32) for name, a in experts.items()}


def _mix(columns, mix):
    """`columns @ mix` over the last (expert) axis, in float64, back in the columns' dtype."""
    return jnp.asarray(np.asarray(columns, np.float64) @ mix, columns.dtype)


def _hidden_axis(name: str) -> int | None:
    if name not in HIDDEN_AXIS:
        raise ValueError(
            f"merge_experts: expert parameter {name!r} is not one of {tuple(HIDDEN_AXIS)}; "
            "merge float experts (before quantizing them)"
        )
    return HIDDEN_AXIS[name]


def _units(name: str, a: np.ndarray) -> np.ndarray:
    """`[F, ...]` one row per hidden unit: all of `a`'s weights that belong to that unit."""
    return np.moveaxis(a, _hidden_axis(name), 0).reshape(a.shape[_hidden_axis(name)], -1)


def _check_num_groups(config: ModelConfig, num_groups: int) -> None:
    num_experts = config.moe.num_experts
    if not isinstance(num_groups, int | np.integer) or not 1 <= num_groups <= num_experts:
        raise ValueError(
            f"merge_experts: num_groups={num_groups!r} must be an integer in [1, "
            f"num_experts={num_experts}]"
        )
    try:
        dataclasses.replace(config.moe, num_experts=int(num_groups))
    except ValueError as e:
        raise ValueError(
            f"merge_experts: num_groups={num_groups} is too few experts for the router "
            f"({e}); use more groups"
        ) from None
