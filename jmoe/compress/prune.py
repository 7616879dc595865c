"""Expert pruning: keep each MoE layer's `keep` highest-scoring experts (PreMoe's probabilistic
expert pruning when the score is TCESS).

The result is an ordinary jmoe model of `keep` experts per MoE layer (`surgery.take_experts` /
`surgery.with_experts`): the kept experts' weights, router columns, logit and selection biases,
every null-expert column and the shared expert are kept as they were, so a token whose chosen
experts all survive computes exactly what it did before.

    stats = router_stats(config, variables, *calibration_tokens("json", tok, seq_len=128,
                                                                 max_sequences=32))
    config4, variables4 = prune_experts(config, variables, stats, keep=4, score="tcess")

Only a per-layer budget exists: every MoE layer keeps the same `keep` experts. A global budget
(the `keep * L_moe` best experts over all layers) leaves layers with different counts, which
one `MoEConfig` cannot hold; padding every layer up to the largest count is per-layer pruning
at that larger count, so it is refused rather than offered under another name.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jmoe.compress import surgery
from jmoe.compress.router_stats import RouterStats
from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import moe_layers

SCORES = ("tcess", "frequency", "weight")
BUDGETS = ("per_layer",)


def expert_scores(stats: RouterStats, score: str) -> np.ndarray:
    """`[L_moe, E]` importance of each expert: "tcess", "frequency" (share of picks) or
    "weight" (frequency x mean weight: the expert's share of the routed combine weight)."""
    if score == "tcess":
        return stats.tcess
    if score == "frequency":
        return stats.frequency
    if score == "weight":
        return stats.frequency * stats.mean_weight
    raise ValueError(f"prune_experts: score={score!r} is not one of {SCORES}")


def kept_experts(stats: RouterStats, keep: int, score: str = "tcess") -> np.ndarray:
    """`[L_moe, keep]` ids of each layer's `keep` highest-scoring experts, ascending (ties go to
    the lower id)."""
    scores_LxE = expert_scores(stats, score)
    if not 1 <= keep <= scores_LxE.shape[1]:
        raise ValueError(
            f"prune_experts: keep={keep} must be in [1, E={scores_LxE.shape[1]}] (the experts "
            "each layer has)"
        )
    best_LxE = np.argsort(-scores_LxE, axis=1, kind="stable")
    return np.sort(best_LxE[:, :keep], axis=1)


def prune_experts(
    config: ModelConfig,
    variables: dict,
    stats: RouterStats,
    keep: int,
    *,
    score: str = "tcess",
    budget: str = "per_layer",
) -> tuple[ModelConfig, dict]:
    """The model with only each MoE layer's `keep` highest-scoring experts.

    Args:
      config, variables: the model (either layer layout; the result has the same).
      stats: router statistics of this model (`router_stats`), e.g. on a task's calibration set.
      keep: experts r to keep per MoE layer, in [1, E]; the router must still fit r experts
        (top-k needs r >= k; null experts r + num_null >= k; top-p with `max_k` r >= max_k;
        group-limited routing needs groups dividing r).
      score: "tcess", "frequency" or "weight" (`expert_scores`).
      budget: "per_layer", the only one (see the module docstring for why no global budget).

    Returns:
      `(config with moe.num_experts = keep, variables)`: an ordinary jmoe model.

    Raises:
      ValueError: keep out of range or too small for the router (naming the router's bound),
        an unknown score or budget, or statistics of another model.
    """
    if budget != "per_layer":
        raise ValueError(
            f"prune_experts: budget={budget!r} is not supported; use one of {BUDGETS}. A global "
            "budget gives layers different expert counts, which one MoEConfig cannot hold (and "
            "padding each layer to the largest count is per_layer pruning at that count)"
        )
    if stats.layers != tuple(moe_layers(config)) or stats.num_experts != (config.moe.num_experts):
        raise ValueError(
            f"prune_experts: the statistics cover layers {list(stats.layers)} with "
            f"{stats.num_experts} experts, the model has MoE layers {moe_layers(config)} "
            f"with {config.moe.num_experts}: compute them on this model (router_stats)"
        )
    return keep_experts(config, variables, kept_experts(stats, keep, score))


def keep_experts(config: ModelConfig, variables: dict, ids_LxR) -> tuple[ModelConfig, dict]:
    """The model keeping experts `ids_LxR[l]` (r distinct ids) of its l-th MoE layer.

    Raises:
      ValueError: r experts do not fit the router (naming its bound), or bad ids.
    """
    ids_LxR = np.asarray(ids_LxR, np.int64)
    layers = surgery.moe_layer_weights(config, variables)
    if ids_LxR.ndim != 2 or len(ids_LxR) != len(layers):
        raise ValueError(
            f"keep_experts: ids of shape {ids_LxR.shape} must be [L_moe={len(layers)}, r]"
        )
    keep = ids_LxR.shape[1]
    error = _router_misfit(config, keep)
    if error is not None:
        allowed = [r for r in range(1, config.moe.num_experts + 1) if not _router_misfit(config, r)]
        raise ValueError(
            f"prune_experts: keep={keep} experts do not fit the router {config.moe.router} "
            f"({error}); it allows keep in {allowed}"
        )
    kept = [surgery.take_experts(w, ids) for w, ids in zip(layers, ids_LxR, strict=True)]
    return surgery.with_experts(config, variables, kept)


def _router_misfit(config: ModelConfig, num_experts: int) -> str | None:
    """Why the layer's router cannot run on `num_experts` experts (None when it can)."""
    try:
        dataclasses.replace(config.moe, num_experts=num_experts)
    except ValueError as error:
        return str(error)
    return None
