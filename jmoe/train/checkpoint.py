"""Run directories and checkpoints (orbax-checkpoint).

A run directory holds `config.yaml` (the resolved config), `checkpoints/<step>/` (the train state
pytree and a JSON state: the data iterator's position, the schedule length), `metrics.jsonl`,
`tensorboard/`, `report.png` and, once finished, `summary.json`. Saves are asynchronous and the
last `max_to_keep` are kept; `restore` brings back exactly what was saved, so a resumed run
continues bit for bit on CPU. A checkpoint that no longer reads back (a truncated file, a save cut
short on a file system without atomic renames) is set aside by `restore_newest`, which resumes
from the newest one that does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from jmoe.train import multihost, report
from jmoe.train.config import Config
from jmoe.train.errors import UserError
from jmoe.train.run_config import RESUMABLE_KEYS, config_diff, config_to_dict, save_config

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints_unreadable"  # beside CHECKPOINT_DIR; orbax never looks there


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore_newest` brought back.

    Attributes:
      step: the checkpoint's step.
      state: the state pytree, shaped like the target.
      json_state: the JSON state saved with it.
      set_aside: the folders that newer, unreadable checkpoints were moved to.
    """

    step: int
    state: Any
    json_state: dict
    set_aside: list[str]


class Checkpointer:
    """Saves and restores `(state pytree, JSON state)` pairs by step.

    Args:
      directory: where step folders go (created if missing).
      max_to_keep: newest checkpoints kept.
      async_save: write in a background thread (`wait` blocks until written).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, json_state: dict) -> None:
        """Starts saving `state` (any pytree of arrays) and the JSON-able `json_state`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(json_state)
            ),
            force=True,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The saved `(state, json_state)` at `step` (default: latest), shaped like `target`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_newest(self, target: Any) -> Restored:
        """Restores the newest checkpoint that reads back whole, shaped like `target`.

        Newer checkpoints that fail to restore (on any process) are moved to `SET_ASIDE_DIR`
        beside the checkpoints, never deleted, each with a warning naming it.

        Raises:
          UserError: when no checkpoint restores; nothing is moved then.
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, json_state = self.restore(target, step)
                error = None
            # A damaged checkpoint fails in many ways (TensorStore, JSON, missing files).
            except Exception as e:  # noqa: BLE001
                error = e
            if multihost.any_process(error is not None):
                failures.append((step, error or "unreadable on another process"))
                continue
            moved = [self._set_aside(bad_step, why) for bad_step, why in failures]
            return Restored(step, state, json_state, moved)
        listing = "; ".join(f"step {step}: {_first_line(why)}" for step, why in failures)
        raise UserError(
            f"no checkpoint in {self.directory} restores ({listing or 'there are none'}). "
            "Start afresh in a new --workdir, or move the damaged step folders out of the way "
            "to start afresh here"
        )

    def _set_aside(self, step: int, why: Exception | str) -> str:
        """Moves step `step`'s folder to `SET_ASIDE_DIR` (process 0 moves; all wait for it)."""
        aside_root = os.path.join(os.path.dirname(self.directory), SET_ASIDE_DIR)
        destination = os.path.join(aside_root, str(step))
        suffix = 1
        while os.path.exists(destination):  # set aside before: keep both
            suffix += 1
            destination = os.path.join(aside_root, f"{step}-{suffix}")
        if multihost.is_chief():
            os.makedirs(aside_root, exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), destination)
            report.warn(
                f"checkpoint step {step} in {self.directory} does not restore "
                f"({_first_line(why)}); set aside as {destination}"
            )
        multihost.any_process(False)  # a barrier: every process sees the move before reloading
        self._manager.reload()
        return destination

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The finalized checkpoint steps of a run directory, ascending (orbax's own listing)."""
    return sorted(ocp.path.step.checkpoint_steps(os.path.join(workdir, CHECKPOINT_DIR)))


def check_run_directory(workdir: str | os.PathLike) -> None:
    """Creates `workdir` if needed and checks that a run can write there.

    Raises:
      UserError: naming the directory, what is wrong and the fix (on every process when it is
        wrong on any).
    """
    problem = None
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        problem = f"it cannot be created ({e.strerror}: {e.filename})"
    else:
        if not os.access(workdir, os.W_OK | os.X_OK):
            problem = "it is not writable"
    if multihost.any_process(problem is not None):
        raise UserError(
            f"run directory {os.fspath(workdir)!r} cannot be used: "
            f"{problem or 'it is unusable on another process'}; choose another --workdir"
        )


def prepare_workdir(workdir: str | os.PathLike, config: Config) -> int | None:
    """Checks that `config` may resume the run in `workdir` and saves it there; returns the
    newest checkpoint step (None for a fresh run).

    A directory whose checkpoints came from a config that differs in anything beyond
    `RESUMABLE_KEYS` (run length, logging, checkpoint cadence) refuses to resume: the error
    names the differing keys and the fix. `train.steps` may move the end of the run, but not
    before the newest checkpoint.
    """
    check_run_directory(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    steps = checkpoint_steps(workdir)
    latest = steps[-1] if steps else None
    if latest is not None and os.path.exists(config_path):
        with open(config_path) as f:
            saved = yaml.safe_load(f)
        differing = [
            key for key in config_diff(saved, config_to_dict(config)) if key not in RESUMABLE_KEYS
        ]
        if differing:
            raise UserError(
                f"run directory {os.fspath(workdir)!r} holds checkpoints of a different config: "
                f"{differing} differ from its {CONFIG_FILE}. Use a new workdir for this config, "
                f"or rerun with the saved values (only {list(RESUMABLE_KEYS)} may change on resume)"
            )
    if latest is not None and config.train.steps < latest:
        raise UserError(
            f"run directory {os.fspath(workdir)!r} is already at step {latest}, past "
            f"train.steps={config.train.steps}: set train.steps={latest} or more to resume it"
        )
    if multihost.is_chief():  # one writer on a shared file system
        save_config(config, config_path)
    return latest


def _first_line(error: Exception | str) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else error
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 200 else line[:197] + "..."
