r"""How each MoE layer's router uses its experts on calibration tokens (`RouterStats`).

Over the N unmasked calibration tokens t, the C chain steps c (1 without a chain) and a layer
of E true experts (plus M null experts, if the router has them):

- **frequency** `[L_moe, E]`: expert e's share of the routed picks. A pick is a (token, step,
  slot) that chose an expert, true or null; an unused slot (top-p, expert choice) is no pick.
  `frequency[e] = #picks of e / #picks`, so the true experts' frequencies sum to
  `1 - null_frequency`, the share of picks that went to null experts.
- **mean_weight** `[L_moe, E]`: the mean combine weight of expert e's picks (0 for an expert
  nobody picks).
- **tcess** `[L_moe, E]`: PreMoe's task-conditioned expected selection score ("PreMoe:
  Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval", 2025): the expected
  confident selection probability of expert e on the task's tokens. With `p_t` the router's
  probabilities over all `E + M` outputs at one step, `K(t)` the indices of its `k` largest and
  `q_{t,e} = p_{t,e} / \sum_{j \in K(t)} p_{t,j}` the probability renormalised over them (for a
  softmax router, the softmax of the top-k logits),

  $$\mathrm{TCESS}_e = \frac{1}{N C} \sum_{c=1}^{C} \sum_{t=1}^{N}
      q^{(c)}_{t,e}\, \mathbb{1}\big[e \in K^{(c)}(t) \wedge q^{(c)}_{t,e} \ge r\big].$$

  The confidence threshold `r` keeps only the selections the router is sure of (a near-tie's
  runner-up does not count); `k` is the router's slots per token (`MoEConfig.slots`). Null
  experts take part in the top-k and the renormalisation but get no score. (The paper's
  released code sums the kept experts' raw logits instead of q; the probability keeps the
  score in [0, 1] and comparable across layers and routers.)

`router_stats(config, variables, tokens, mask)` computes them from a forward pass
(`jmoe.compress.trace`); `RouterStats.save(run_dir / "router_stats" / f"{name}.json")` keeps them
with the run (`stats_path`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from jmoe.compress.trace import layer_routings
from jmoe.lm.config import ModelConfig
from jmoe.moe.routing import Routing

DEFAULT_CONFIDENCE = 0.1
STATS_DIR = "router_stats"


@dataclasses.dataclass(frozen=True)
class RouterStats:
    """Router statistics of the MoE layers on one calibration set (the module docstring defines
    each).

    Attributes:
      layers: the MoE layers' indices in the model, the order of the `[L_moe, ...]` rows.
      frequency: `[L_moe, E]` share of routed picks per true expert.
      mean_weight: `[L_moe, E]` mean combine weight when picked (0 when never picked).
      tcess: `[L_moe, E]` task-conditioned expected selection score.
      null_frequency: `[L_moe]` share of picks that went to null experts (0 without them).
      num_tokens: unmasked calibration tokens N.
      confidence: the TCESS threshold r.
      top_k: the TCESS k.
      source: what the tokens were (a calibration set name, free text).
    """

    layers: tuple[int, ...]
    frequency: np.ndarray
    mean_weight: np.ndarray
    tcess: np.ndarray
    null_frequency: np.ndarray
    num_tokens: int
    confidence: float
    top_k: int
    source: str = ""

    ARRAYS = ("frequency", "mean_weight", "tcess", "null_frequency")

    @property
    def num_experts(self) -> int:
        return self.frequency.shape[1]

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes the statistics as JSON to `path` (parent folders created); returns the path."""
        return save_fields(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RouterStats:
        """Reads statistics `save` wrote."""
        fields = json.loads(pathlib.Path(path).read_text())
        for name in cls.ARRAYS:
            fields[name] = np.asarray(fields[name], np.float64)
        return cls(**{**fields, "layers": tuple(fields["layers"])})


def save_fields(record, path: str | os.PathLike) -> pathlib.Path:
    """Writes a dataclass's fields as JSON to `path` (parent folders created; arrays and tuples
    as lists); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    fields = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in fields.items()}
    path.write_text(json.dumps(fields, indent=1))
    return path


def stats_path(run_dir: str | os.PathLike, name: str) -> pathlib.Path:
    """Where a run keeps its statistics on calibration set `name`:
    `run_dir/router_stats/<name>.json`."""
    return pathlib.Path(run_dir) / STATS_DIR / f"{name}.json"


def router_stats(
    config: ModelConfig,
    variables: dict,
    tokens_BxS,
    mask_BxS=None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    source: str = "",
) -> RouterStats:
    """The router statistics of every MoE layer on `tokens_BxS` (padding masked out).

    Args:
      config, variables: the model (either layer layout).
      tokens_BxS: int token ids (e.g. from `calibration_tokens`).
      mask_BxS: bool, False on padding (None: every token counts).
      confidence: the TCESS threshold r in [0, 1].
      source: recorded in the result (the calibration set's name).
    """
    routings = layer_routings(config, variables, tokens_BxS, mask_BxS)
    mask_T = None if mask_BxS is None else np.asarray(mask_BxS, bool).reshape(-1)
    return stats_from_routings(
        routings,
        mask_T,
        num_experts=config.moe.num_experts,
        top_k=config.moe.slots,
        confidence=confidence,
        source=source,
    )


def stats_from_routings(
    routings: Mapping[int, Sequence[Routing]],
    mask_T: np.ndarray | None,
    *,
    num_experts: int,
    top_k: int,
    confidence: float = DEFAULT_CONFIDENCE,
    source: str = "",
) -> RouterStats:
    """`RouterStats` from each layer's routings (one per chain step, `[T, ...]` arrays).

    Args:
      routings: `{layer: (Routing, ...)}` as `jmoe.compress.trace.layer_routings` returns.
      mask_T: bool, False for tokens to leave out (None: all count).
      num_experts: true experts E (null experts are the router columns past E).
      top_k: the TCESS k (capped at the router's outputs).
      confidence: the TCESS threshold r in [0, 1].
      source: recorded in the result.
    """
    if not 0 <= confidence <= 1:
        raise ValueError(f"router_stats: confidence={confidence} must be in [0, 1]")
    if top_k < 1:
        raise ValueError(f"router_stats: top_k={top_k} must be >= 1")
    layers = sorted(routings)
    rows = [_layer_stats(routings[i], mask_T, num_experts, top_k, confidence) for i in layers]
    num_tokens = rows[0][-1] if rows else 0
    frequency, mean_weight, tcess, null_frequency = (
        np.asarray([row[j] for row in rows], np.float64).reshape(len(rows), -1) for j in range(4)
    )
    return RouterStats(
        layers=tuple(layers),
        frequency=frequency,
        mean_weight=mean_weight,
        tcess=tcess,
        null_frequency=null_frequency.reshape(-1),
        num_tokens=num_tokens,
        confidence=float(confidence),
        top_k=int(top_k),
        source=source,
    )


def _layer_stats(steps: Sequence[Routing], mask_T, num_experts: int, top_k: int, r: float):
    """`(frequency_E, mean_weight_E, tcess_E, null_frequency, num_tokens)` of one layer."""
    e = num_experts
    picks_E, weight_E, tcess_E = np.zeros(e), np.zeros(e), np.zeros(e)
    null_picks = 0
    for step in steps:
        ids_TxK, valid_TxK = np.asarray(step.expert_ids), np.asarray(step.valid, bool)
        weights_TxK, probs_TxA = np.asarray(step.weights, np.float64), np.asarray(step.probs)
        token_T = np.ones(len(ids_TxK), bool) if mask_T is None else mask_T
        picked_TxK = valid_TxK & token_T[:, None]
        picks_E += np.bincount(ids_TxK[picked_TxK], minlength=e)[:e]
        weight_E += np.bincount(ids_TxK[picked_TxK], weights_TxK[picked_TxK], minlength=e)[:e]
        if step.choices is not None:  # 1. a null pick is a raw choice past the true experts
            null_picks += int(((np.asarray(step.choices) >= e) & token_T[:, None]).sum())
        # 2. TCESS: top-k of the probabilities over all outputs (ties: lower index first),
        # renormalised over those k, kept where confident; null columns are dropped after.
        k = min(top_k, probs_TxA.shape[1])
        top_TxK = np.argsort(-probs_TxA, axis=1, kind="stable")[:, :k]
        top_p_TxK = np.take_along_axis(probs_TxA, top_TxK, axis=1).astype(np.float64)
        q_TxK = top_p_TxK / np.maximum(top_p_TxK.sum(1, keepdims=True), 1e-30)
        kept_TxK = (q_TxK >= r) & token_T[:, None] & (top_TxK < e)
        tcess_E += np.bincount(top_TxK[kept_TxK], q_TxK[kept_TxK], minlength=e)[:e]
    num_tokens = int(token_T.sum()) if steps else 0
    total_picks = picks_E.sum() + null_picks
    frequency_E = picks_E / max(total_picks, 1)
    mean_weight_E = np.where(picks_E > 0, weight_E / np.maximum(picks_E, 1), 0.0)
    tcess_E = tcess_E / max(num_tokens * len(steps), 1)
    return frequency_E, mean_weight_E, tcess_E, null_picks / max(total_picks, 1), num_tokens
