"""Where a run's metrics go: `metrics.jsonl` (one JSON object per line), TensorBoard event files
in `tensorboard/` beside it (tensorboardX), and Weights & Biases when `train.wandb_project` is
set. Only process 0 writes.

A training line holds the scalars of a step (loss, learning rate, gradient and parameter norms,
tokens/s, MFU, the MoE losses) and, per MoE layer, tokens per expert, active experts per token,
dropped fraction and router entropy; an evaluation line holds the held-out loss and perplexity.
Numbers that are not finite are written as JSON `null`, so every line stays valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator

import jax
import numpy as np

from jmoe.lm.flops import flops_per_token
from jmoe.train import report
from jmoe.train.config import Config, TrainConfig
from jmoe.train.errors import UserError
from jmoe.train.run_config import config_to_dict

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
PER_LAYER_STATS = ("tokens_per_expert", "active_experts", "dropped_fraction", "router_entropy")


def step_record(step: int, metrics: dict, lr: float, tokens_per_s: float | None, config: Config):
    """The metrics.jsonl line of a training step: scalars, per-MoE-layer stats and MFU
    (`bad_steps` > 0 marks a skipped non-finite step; no throughput yet: tokens/s and MFU
    None)."""
    record = {"step": step, "lr": lr, "tokens_per_s": tokens_per_s}
    for key, value in metrics.items():
        if key in PER_LAYER_STATS or np.ndim(value) == 0:
            record[key] = value
    active = metrics.get("active_experts")
    flops = flops_per_token(config.model, config.data.seq_len, active_experts=active)
    record["flops_per_token"] = flops
    record["mfu"] = report.mfu(flops, tokens_per_s, jax.devices()) if tokens_per_s else None
    return record


class MetricsLog:
    """Appends one JSON object per line to `path` (arrays become lists, non-finite numbers
    null); a no-op unless `enabled`."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")

    def truncate(self, step: int) -> None:
        """Drops the lines past `step` (logged after the checkpoint a run resumes from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(_jsonable(r), allow_nan=False) + "\n" for r in keep)
        os.replace(tmp, self.path)  # the history is never missing, even after a crash here

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` file, oldest first."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(record: dict) -> Iterator[tuple[str, float | np.ndarray]]:
    """`(tag, value)` pairs of a record for dashboards: "train/<key>" or "eval/<key>" scalars;
    per-layer stats as "<key>/layer_<i>" scalars, except the expert loads, which come as
    "expert_load/layer_<i>" arrays (each expert's share of routed tokens) together with the
    layer's max violation ("expert_load_max_violation/layer_<i>": busiest expert's load over
    the mean load, minus 1; 0 is perfect balance)."""
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if key not in PER_LAYER_STATS:
            group, name = (
                ("eval", key[len("eval_") :]) if key.startswith("eval_") else ("train", key)
            )
            yield f"{group}/{name}", float(value)
            continue
        for layer, row in _layer_rows(key, value):
            if key == "tokens_per_expert":
                share_E = row / max(row.sum(), 1e-12)
                yield f"expert_load/{layer}", share_E
                yield f"expert_load_max_violation/{layer}", float(share_E.max() * len(row) - 1)
            else:
                yield f"{key}/{layer}", float(row)


def _layer_rows(key: str, value) -> Iterator[tuple[str, np.ndarray]]:
    """Per-layer rows of a stat: `[L]` or `[L, E]`, with chain steps `[L, C]` / `[L, C, E]`
    (named "layer_<i>_step_<c>")."""
    array = np.asarray(value, np.float64)
    lead = array.shape[:-1] if key == "tokens_per_expert" else array.shape
    for index in np.ndindex(*lead):
        name = f"layer_{index[0]}" + "".join(f"_step_{i}" for i in index[1:])
        yield name, array[index]


class TensorBoardLog:
    """TensorBoard event files in `directory`; events past `purge_step` from an earlier,
    interrupted session are hidden (tensorboardX's purge)."""

    def __init__(self, directory: str | os.PathLike, purge_step: int | None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.fspath(directory), purge_step=purge_step, flush_secs=30)

    def write(self, record: dict) -> None:
        for tag, value in series(record):
            if np.ndim(value):
                self._writer.add_histogram(tag, value, record["step"])
            else:
                self._writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self._writer.close()


class WandbLog:
    """A Weights & Biases run of `project`; its id is kept in the run directory, so a resumed
    run continues the same W&B run."""

    def __init__(self, project: str, workdir: str | os.PathLike, config: Config):
        wandb = _import_wandb(project)
        id_path = os.path.join(workdir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(8)
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self._run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            name=os.path.basename(os.path.abspath(workdir)),
            dir=os.fspath(workdir),
            config=config_to_dict(config),
        )

    def write(self, record: dict) -> None:
        scalars = {tag: value for tag, value in series(record) if not np.ndim(value)}
        self._run.log(scalars, step=record["step"])

    def close(self) -> None:
        self._run.finish()


class MetricsWriters:
    """Every destination of a run's metrics behind one `write(record)` / `close()`."""

    def __init__(self, writers: list):
        self.writers = writers

    def write(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_metrics(workdir: str, config: Config, start_step: int, enabled: bool) -> MetricsWriters:
    """The run's metrics destinations, continuing after `start_step` (later lines from an
    interrupted session are dropped); none unless `enabled` (process 0)."""
    if not enabled:
        return MetricsWriters([])
    log = MetricsLog(os.path.join(workdir, METRICS_FILE))
    log.truncate(start_step)
    purge_step = start_step + 1 if start_step else None
    writers = [log, TensorBoardLog(os.path.join(workdir, TENSORBOARD_DIR), purge_step)]
    if config.train.wandb_project:
        writers.append(WandbLog(config.train.wandb_project, workdir, config))
    return MetricsWriters(writers)


def check_wandb(train: TrainConfig) -> None:
    """Fails early when `train.wandb_project` is set but wandb is not installed."""
    if train.wandb_project:
        _import_wandb(train.wandb_project)


def _import_wandb(project: str):
    try:
        import wandb
    except ImportError:
        raise UserError(
            f"train.wandb_project={project!r} needs Weights & Biases: pip install wandb (or "
            "leave train.wandb_project unset for metrics.jsonl and TensorBoard only)"
        ) from None
    return wandb


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
