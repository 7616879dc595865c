"""Saving a compressed model as a run directory that serves like any `train.py` run.

`save_compressed` writes the source run's `config.yaml` with the new model config, a copy of its
`tokenizer/`, one checkpoint holding the `params` and `moe_state` (the layout
`jmoe.serve.runs.load_run` restores) and `compression.json`, a record of what was done. The
directory is written under a temporary name beside `out_dir` and renamed into place at the end,
so a failure leaves nothing half-written; an existing non-empty `out_dir` is never overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jmoe.compress.surgery import Variables, expert_param_bytes
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.serve.runs import TOKENIZER_DIR, missing_parts
from jmoe.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, Checkpointer, checkpoint_steps
from jmoe.train.run_config import load_config, save_config

RECORD_FILE = "compression.json"
_SAVED = ("params", "moe_state")


def save_compressed(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_config: ModelConfig,
    variables: Variables,
    note: str = "",
) -> pathlib.Path:
    """Writes `(model_config, variables)` as a new run directory `out_dir`, derived from the run
    `run_dir` (whose data, training and mesh settings and tokenizer it keeps).

    `Engine.from_run(out_dir)` and `python serve.py --run out_dir` serve it; the served model id
    is `out_dir`'s name. The checkpoint takes the source run's newest step.

    Args:
      run_dir: the source `train.py` run directory (its `config.yaml` and `tokenizer/` are read).
      out_dir: the directory to create; it must not exist or be empty.
      model_config: the compressed model's config (pruned, merged, quantized ...).
      variables: `{"params": ..., "moe_state": ...}` of `Transformer(model_config)`, in its layer
        layout.
      note: what was done (kept in `compression.json`, with the source, the step, the expert
        count, the quantization and the expert bytes).

    Returns:
      The path of the new run directory.

    Raises:
      FileNotFoundError: `run_dir` lacks its config or tokenizer.
      FileExistsError: `out_dir` exists and is not empty.
      ValueError: `variables` do not fit `model_config` (the differing paths are named).
    """
    src, out = pathlib.Path(run_dir).expanduser(), pathlib.Path(out_dir).expanduser()
    missing = [m for m in missing_parts(src) if "checkpoint" not in m]
    if missing:
        raise FileNotFoundError(
            f"save_compressed: {str(src)!r} is not a run directory: missing " + "; ".join(missing)
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"save_compressed: {str(out)!r} already exists and is not empty; choose a new out_dir "
            "(a saved model is never overwritten)"
        )
    saved = {name: variables.get(name, {}) for name in _SAVED}
    _check_fits(model_config, saved)
    config = load_config(src / CONFIG_FILE, resolve_init_from=False)
    config = dataclasses.replace(config, model=model_config)
    steps = checkpoint_steps(src)
    step = steps[-1] if steps else 0
    record = {
        "source_run": str(src.resolve()),
        "source_step": step,
        "note": note,
        "num_experts": model_config.moe.num_experts,
        "expert_quantization": model_config.moe.expert_quantization,
        "expert_param_bytes": expert_param_bytes(model_config, saved),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_config(config, tmp / CONFIG_FILE)
        shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        with Checkpointer(tmp / CHECKPOINT_DIR, max_to_keep=1, async_save=False) as ckpt:
            ckpt.save(step, saved, {"compression": record})
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above): a directory is renamed only onto a new path
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_fits(config: ModelConfig, saved: Variables) -> None:
    """Raises a ValueError naming each path whose shape or dtype differs from the model's own."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)

    def spec(tree):
        flat = traverse_util.flatten_dict(tree)
        return {"/".join(k): (tuple(np.shape(a)), jnp.dtype(a.dtype).name) for k, a in flat.items()}

    want = spec({name: abstract.get(name, {}) for name in _SAVED})
    got = spec(saved)
    problems = [
        f"{path}: {got.get(path, 'missing')} != model's {want.get(path, 'none')}"
        for path in sorted(set(want) | set(got))
        if want.get(path) != got.get(path)
    ]
    if problems:
        raise ValueError(
            "save_compressed: the variables do not fit the model config (shape, dtype): "
            + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        )
