"""Task-adaptive expert retrieval (PreMoe's TAER): keep one small expert set per task, and serve
a query with the set of the task whose routing it resembles.

`TaskExpertSets.build` measures each task's TCESS pattern (`[L_moe, E]`, `router_stats`) on its
calibration text and stores it with the task's `keep` best experts per layer (`kept_experts`).
For a query, `nearest` measures the query tokens' own pattern and picks the task whose stored
pattern has the highest cosine similarity with it (both flattened over layers and experts);
`pruned_for_query` returns the model pruned to that task's experts.

    sets = TaskExpertSets.build(config, variables, tokenizer, ["asyncio", "email"], keep=4)
    sets.save(run_dir / "task_experts.json")
    task, config4, variables4 = sets.pruned_for_query(config, variables, query_tokens_BxS)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from jmoe.compress.calibration import calibration_tokens
from jmoe.compress.prune import keep_experts, kept_experts
from jmoe.compress.router_stats import DEFAULT_CONFIDENCE, RouterStats, router_stats, save_fields
from jmoe.lm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TaskExpertSets:
    """Each task's TCESS pattern and expert set.

    Attributes:
      tasks: the task names, the order of the rows below.
      patterns: `[N_tasks, L_moe, E]` TCESS of each task.
      expert_ids: `[N_tasks, L_moe, keep]` each task's kept experts per layer, ascending.
      layers: the MoE layers' indices.
      keep: experts kept per layer.
      confidence: the TCESS threshold the patterns were measured with (queries use it too).
    """

    tasks: tuple[str, ...]
    patterns: np.ndarray
    expert_ids: np.ndarray
    layers: tuple[int, ...]
    keep: int
    confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        variables: dict,
        tokenizer,
        tasks: Sequence[str] | Mapping[str, Sequence[str]],
        keep: int,
        *,
        seq_len: int = 128,
        max_sequences: int = 32,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> TaskExpertSets:
        """Measures every task's pattern and expert set.

        Args:
          config, variables, tokenizer: the model and its tokenizer.
          tasks: calibration set names (`CALIBRATION_SETS`), or `{name: texts}`.
          keep: experts per layer each task keeps (`prune_experts`' bounds apply when pruning).
          seq_len, max_sequences: the calibration sequences (`calibration_tokens`).
          confidence: the TCESS threshold r.
        """
        named = tasks if isinstance(tasks, Mapping) else {name: name for name in tasks}
        if not named:
            raise ValueError("TaskExpertSets.build: give at least one task")
        stats = [
            router_stats(
                config,
                variables,
                *calibration_tokens(texts, tokenizer, seq_len=seq_len, max_sequences=max_sequences),
                confidence=confidence,
                source=name,
            )
            for name, texts in named.items()
        ]
        return cls(
            tasks=tuple(named),
            patterns=np.stack([s.tcess for s in stats]),
            expert_ids=np.stack([kept_experts(s, keep, "tcess") for s in stats]),
            layers=stats[0].layers,
            keep=keep,
            confidence=confidence,
        )

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes the sets as JSON to `path` (parent folders created); returns the path."""
        return save_fields(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskExpertSets:
        """Reads sets `save` wrote."""
        fields = json.loads(pathlib.Path(path).read_text())
        return cls(
            tasks=tuple(fields["tasks"]),
            patterns=np.asarray(fields["patterns"], np.float64),
            expert_ids=np.asarray(fields["expert_ids"], np.int64),
            layers=tuple(fields["layers"]),
            keep=int(fields["keep"]),
            confidence=float(fields["confidence"]),
        )

    def similarities(self, pattern_LxE: np.ndarray) -> np.ndarray:
        """`[N_tasks]` cosine similarity of `pattern_LxE` with each task's pattern (flattened)."""
        if pattern_LxE.shape != self.patterns.shape[1:]:
            raise ValueError(
                f"TaskExpertSets: a pattern of shape {pattern_LxE.shape} does not match the "
                f"stored {self.patterns.shape[1:]} (L_moe, E): measure it on the same model"
            )
        query_P = pattern_LxE.reshape(-1)
        tasks_NxP = self.patterns.reshape(len(self.tasks), -1)
        norms_N = np.linalg.norm(tasks_NxP, axis=1) * np.linalg.norm(query_P)
        return tasks_NxP @ query_P / np.maximum(norms_N, 1e-30)

    def query_stats(self, config: ModelConfig, variables: dict, tokens_BxS, mask_BxS=None):
        """The query tokens' `RouterStats` (at the stored confidence)."""
        stats = router_stats(
            config, variables, tokens_BxS, mask_BxS, confidence=self.confidence, source="query"
        )
        if not stats.tcess.any():
            raise ValueError(
                "TaskExpertSets: the query has no confident routing (TCESS all zero): give "
                "unmasked tokens or build the sets with a lower confidence"
            )
        return stats

    def nearest(
        self, config: ModelConfig, variables: dict, tokens_BxS, mask_BxS=None
    ) -> tuple[str, np.ndarray]:
        """The task whose pattern is most cosine-similar to the query's, and every task's
        similarity (`[N_tasks]`, in `tasks` order; ties go to the earlier task)."""
        stats: RouterStats = self.query_stats(config, variables, tokens_BxS, mask_BxS)
        similarity_N = self.similarities(stats.tcess)
        return self.tasks[int(np.argmax(similarity_N))], similarity_N

    def pruned(self, config: ModelConfig, variables: dict, task: str) -> tuple[ModelConfig, dict]:
        """The model keeping only task `task`'s experts (an ordinary jmoe model)."""
        if task not in self.tasks:
            raise ValueError(f"TaskExpertSets: unknown task {task!r}; known: {list(self.tasks)}")
        return keep_experts(config, variables, self.expert_ids[self.tasks.index(task)])

    def pruned_for_query(
        self, config: ModelConfig, variables: dict, tokens_BxS, mask_BxS=None
    ) -> tuple[str, ModelConfig, dict]:
        """`(task, config, variables)`: the model pruned to the nearest task's experts."""
        task, _ = self.nearest(config, variables, tokens_BxS, mask_BxS)
        return (task, *self.pruned(config, variables, task))
