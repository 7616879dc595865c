"""Run directories and checkpoints (orbax-checkpoint).

A run directory holds `config.yaml` (the resolved config), `checkpoints/<step>/` (the train state
pytree and the data iterator's state as JSON), `metrics.jsonl` and `report.png`. Saves are
asynchronous and the last `max_to_keep` are kept; `restore` brings back exactly what was saved,
so a resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from jmoe.train.config import Config
from jmoe.train.run_config import RESUMABLE_KEYS, config_diff, config_to_dict, save_config

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores `(state pytree, data iterator state)` pairs by step.

    Args:
      directory: where step folders go (created if missing).
      max_to_keep: newest checkpoints kept.
      async_save: write in a background thread (`wait` blocks until written).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts saving `state` (any pytree of arrays) and the JSON-able `data_state`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The saved `(state, data_state)` at `step` (default: latest), shaped like `target`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self._manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def prepare_workdir(workdir: str | os.PathLike, config: Config) -> bool:
    """Creates the run directory and saves the config; returns whether a checkpoint exists.

    A directory whose checkpoints came from a config that differs in anything beyond
    `RESUMABLE_KEYS` (logging, checkpoint cadence) refuses to resume: the error names
    the differing keys and the fix.
    """
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, CONFIG_FILE)
    checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
    has_checkpoint = os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints)
    )
    if has_checkpoint and os.path.exists(config_path):
        with open(config_path) as f:
            saved = yaml.safe_load(f)
        differing = [
            key for key in config_diff(saved, config_to_dict(config)) if key not in RESUMABLE_KEYS
        ]
        if differing:
            raise ValueError(
                f"run directory {workdir!r} holds checkpoints of a different config: "
                f"{differing} differ from its {CONFIG_FILE}. Use a new workdir for this config, "
                f"or rerun with the saved values (only {list(RESUMABLE_KEYS)} may change on resume)"
            )
    if jax.process_index() == 0:  # one writer on a shared file system
        save_config(config, config_path)
    return has_checkpoint
