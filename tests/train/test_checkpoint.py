"""jmoe.checkpoint: exact save/restore of state pytrees and data-iterator state, retention, and
the refusal to resume a run directory of a different config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.train.checkpoint import CONFIG_FILE, Checkpointer, prepare_workdir
from jmoe.train.run_config import load_config


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)},
        "bf16": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.PRNGKey(seed),
        "moe_state": {"layers_0": {"bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}},
    }


def test_restore_is_exact(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(_state(0))
    saved = _state(7)
    ckpt.save(7, saved, {"next_index": 42, "epoch": 1})
    ckpt.wait()
    restored, data_state = Checkpointer(tmp_path / "ckpt", max_to_keep=3).restore(_state(0))
    assert data_state == {"next_index": 42, "epoch": 1}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ckpt.close()


def test_keeps_last_n_and_restores_by_step(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"next_index": step})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2", "3"]
    restored, data_state = ckpt.restore(_state(0), step=2)
    assert int(restored["step"]) == 2 and data_state == {"next_index": 2}
    ckpt.close()


def test_prepare_workdir_saves_config_and_detects_checkpoints(tmp_path):
    config = load_config(None, ["train.steps=10"])
    assert prepare_workdir(tmp_path / "run", config) is False
    assert load_config(tmp_path / "run" / CONFIG_FILE) == config
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", max_to_keep=1)
    ckpt.save(1, _state(1), {})
    ckpt.close()
    # Logging and checkpoint cadence may change on resume; the run length sets the learning-rate
    # schedule, so it may not.
    relogged = load_config(None, ["train.steps=10", "train.log_every=5"])
    assert prepare_workdir(tmp_path / "run", relogged) is True
    assert load_config(tmp_path / "run" / CONFIG_FILE) == relogged
    with pytest.raises(ValueError, match=r"\['train.steps'\] differ"):
        prepare_workdir(tmp_path / "run", load_config(None, ["train.steps=20"]))


def test_refuses_to_resume_a_different_config(tmp_path):
    prepare_workdir(tmp_path, load_config())
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=1)
    ckpt.save(1, _state(1), {})
    ckpt.close()
    other = load_config(None, ["model.moe.router.k=1", "train.learning_rate=1e-4"])
    with pytest.raises(ValueError) as info:
        prepare_workdir(tmp_path, other)
    msg = str(info.value)
    assert "model.moe.router.k" in msg and "train.learning_rate" in msg and "new workdir" in msg
    assert load_config(tmp_path / CONFIG_FILE) == load_config()  # the saved config is kept
