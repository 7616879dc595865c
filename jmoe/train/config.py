"""The run's schemas: `DataConfig`, `TrainConfig` and the root `Config` that gathers them
with the model and the mesh."""

from __future__ import annotations

import dataclasses

from jmoe.lm.config import ModelConfig
from jmoe.sharding import MeshConfig
from jmoe.validation import check as _check

TOKENIZERS = ("byte", "bpe")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training text, tokenizer and batch shape.

    The model's vocabulary follows the tokenizer: "bpe" trains a byte-level BPE of exactly
    `model.vocab_size` symbols on the training split; "byte" (256 bytes + end-of-text) and a
    user `tokenizer.json` path need `model.vocab_size` >= the tokenizer's size (checked when the
    run starts; the extra rows are never targets).

    Attributes:
      source: "stdlib" (the running interpreter's standard-library `.py` files, no download), or
        a text file, directory, glob or `.jsonl` file with a "text" field.
      max_bytes: read at most this many bytes of the source (None: all of it).
      eval_fraction: fraction of the documents held out for evaluation (deterministic split).
      tokenizer: "byte", "bpe" or a path to a `tokenizer.json` / saved tokenizer directory
        (with `model.init_from`, the checkpoint's own tokenizer is used and this is not set).
      seq_len: tokens per training sequence (at most `model.max_seq_len`).
      batch_size: global batch in sequences (split evenly over processes).
      seed: split and shuffle seed.
      prefetch: batches prepared ahead by background threads (0 disables).
    """

    source: str = "stdlib"
    max_bytes: int | None = 4_000_000
    eval_fraction: float = 0.02
    tokenizer: str = "bpe"
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    prefetch: int = 2

    def __post_init__(self):
        owner = "DataConfig"
        _check("source", self.source, bool(self.source), "'stdlib' or a path / glob", owner)
        _check(
            "max_bytes",
            self.max_bytes,
            self.max_bytes is None or self.max_bytes >= 1,
            "None (all) or an integer >= 1",
            owner,
        )
        _check("eval_fraction", self.eval_fraction, 0 < self.eval_fraction < 1, "in (0, 1)", owner)
        _check(
            "tokenizer",
            self.tokenizer,
            bool(self.tokenizer),
            f"one of {TOKENIZERS} or a path to a tokenizer.json",
            owner,
        )
        for name in ("seq_len", "batch_size"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1", owner)
        _check("prefetch", self.prefetch, self.prefetch >= 0, "an integer >= 0", owner)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, evaluation, checkpoints and logging.

    Attributes:
      steps: total optimizer steps (a resumed run continues up to this).
      learning_rate: peak learning rate of the warmup + cosine schedule.
      warmup_steps: linear warmup from 0 to `learning_rate`.
      final_lr_fraction: the cosine decays to `learning_rate * final_lr_fraction` at `steps`.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay on matrices (never on norms, biases, router bias).
      grad_clip: clip by global norm (None disables).
      seed: parameter init and per-step RNG seed.
      log_every: steps between metrics.jsonl lines and progress-bar updates.
      eval_every: steps between held-out evaluations (also at the last step).
      eval_batches: held-out batches per evaluation (None: the whole held-out split).
      checkpoint_every: steps between (async) checkpoints (also at the last step).
      max_to_keep: checkpoints kept.
      max_bad_steps: stop after this many non-finite steps in a row (each one is skipped).
      progress: show a progress bar.
      plot: write `report.png` (losses, learning rate, expert load) at the end.
      wandb_project: also log to this Weights & Biases project (needs `pip install wandb`);
        None logs to `metrics.jsonl` and TensorBoard only.
    """

    steps: int = 500
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None
    checkpoint_every: int = 100
    max_to_keep: int = 2
    max_bad_steps: int = 10
    progress: bool = True
    plot: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        owner = "TrainConfig"
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1", owner)
        for name in ("warmup_steps", "weight_decay", "eps"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0", owner)
        _check("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0", owner)
        _check(
            "final_lr_fraction",
            self.final_lr_fraction,
            0 <= self.final_lr_fraction <= 1,
            "in [0, 1]",
            owner,
        )
        for name in ("b1", "b2"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)", owner)
        _check(
            "grad_clip",
            self.grad_clip,
            self.grad_clip is None or self.grad_clip > 0,
            "None (no clipping) or a number > 0",
            owner,
        )
        _check(
            "eval_batches",
            self.eval_batches,
            self.eval_batches is None or self.eval_batches >= 1,
            "None (all) or an integer >= 1",
            owner,
        )
        _check(
            "max_bad_steps", self.max_bad_steps, self.max_bad_steps >= 1, "an integer >= 1", owner
        )
        _check(
            "wandb_project",
            self.wandb_project,
            self.wandb_project is None or bool(self.wandb_project.strip()),
            "None (no Weights & Biases) or a project name",
            owner,
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, data, training and device mesh (`load_config` builds one)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _check(
            "data.seq_len",
            self.data.seq_len,
            self.data.seq_len <= self.model.max_seq_len,
            f"at most model.max_seq_len={self.model.max_seq_len}",
            "Config",
        )
