"""Loading a `train.py` run directory for serving: its config, tokenizer and newest weights.

A run directory holds `config.yaml`, `tokenizer/` and `checkpoints/<step>/` (see
`jmoe.train.checkpoint`). Only the `params` and `moe_state` parts of the newest checkpoint are
read (not the optimizer moments). A tokenizer directory may also hold a Hugging Face
`tokenizer_config.json` or `chat_template.jinja` whose chat template the chat endpoint applies
(`jmoe.hf_tokenizer.load_chat_template`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jmoe.hf_tokenizer import load_chat_template
from jmoe.lm.model import Transformer
from jmoe.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE
from jmoe.train.config import Config
from jmoe.train.run_config import load_config
from jmoe.train.tokenizer import BYTE_FILE, HF_FILE, load_tokenizer

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class Run:
    """What serving needs from a run directory.

    Attributes:
      name: the directory's name (the served model id).
      config: the run's `Config`.
      variables: `{"params": ..., "moe_state": ...}` of the newest checkpoint (NumPy arrays).
      tokenizer: the run's tokenizer (`jmoe.train.tokenizer`).
      step: the checkpoint's training step.
      chat_template: the tokenizer's Jinja chat template, or None.
    """

    name: str
    config: Config
    variables: dict[str, Any]
    tokenizer: Any
    step: int
    chat_template: str | None


def missing_parts(run_dir: str | os.PathLike) -> list[str]:
    """What a servable run directory lacks (empty when complete)."""
    root = pathlib.Path(run_dir)
    if not root.is_dir():
        return [f"the run directory {str(root)!r} itself"]
    missing = []
    if not (root / CONFIG_FILE).is_file():
        missing.append(f"{CONFIG_FILE} (the run's config)")
    tok = root / TOKENIZER_DIR
    if not ((tok / HF_FILE).is_file() or (tok / BYTE_FILE).is_file()):
        missing.append(f"{TOKENIZER_DIR}/{HF_FILE} or {TOKENIZER_DIR}/{BYTE_FILE}")
    if _latest_step(root / CHECKPOINT_DIR) is None:
        missing.append(f"a finished checkpoint under {CHECKPOINT_DIR}/")
    return missing


def _latest_step(directory: pathlib.Path) -> int | None:
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory.resolve(), item_names=("state", "data")) as manager:
        return manager.latest_step()


def load_run(run_dir: str | os.PathLike) -> Run:
    """Loads a `train.py` run directory's config, tokenizer and newest params and MoE state.

    Raises:
      FileNotFoundError: naming every missing part when the directory is not a complete run.
    """
    root = pathlib.Path(run_dir).expanduser()
    missing = missing_parts(root)
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not a complete train.py run directory: missing "
            + "; ".join(missing)
            + ". Train one with `python train.py --workdir DIR` (it writes all of these)"
        )
    config = load_config(root / CONFIG_FILE, resolve_init_from=False)
    step = _latest_step(root / CHECKPOINT_DIR)
    return Run(
        name=root.resolve().name,
        config=config,
        variables=restore_variables(config, root / CHECKPOINT_DIR, step),
        tokenizer=load_tokenizer(root / TOKENIZER_DIR),
        step=step,
        chat_template=load_chat_template(root / TOKENIZER_DIR),
    )


def restore_variables(config: Config, checkpoints: pathlib.Path, step: int) -> dict[str, Any]:
    """The `params` and `moe_state` of checkpoint `step`, shaped like the model's own."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(Transformer(config.model).init, jax.random.key(0), tokens)
    target = {name: abstract.get(name, {}) for name in ("params", "moe_state")}  # host arrays
    restore = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,  # the optimizer state, step and RNG stay on disk
    )
    with ocp.CheckpointManager(checkpoints.resolve(), item_names=("state", "data")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=restore))
    return dict(restored["state"])
