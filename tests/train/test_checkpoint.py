"""jmoe.train.checkpoint: exact save/restore of state pytrees and JSON state, retention, the
fallback past unreadable checkpoints, unusable run directories and the resume policy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.train.checkpoint import (
    CONFIG_FILE,
    SET_ASIDE_DIR,
    Checkpointer,
    check_run_directory,
    checkpoint_steps,
    prepare_workdir,
)
from jmoe.train.errors import UserError
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


# A failed restore leaves an orbax callback for an event loop it has closed; harmless.
FAILED_RESTORE_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _damage(step_dir):
    """Cuts every array data file of a saved step short, as a full disk or a killed copy would."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[:8])


@FAILED_RESTORE_NOISE
def test_restore_newest_sets_aside_unreadable_checkpoints(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.wait()
    _damage(tmp_path / "checkpoints" / "3")
    (tmp_path / "checkpoints" / "2" / "data" / "metadata").write_text("{not json")
    restored = ckpt.restore_newest(_state(0))
    assert (restored.step, restored.json_state) == (1, {"step": 1})
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(_state(1)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    aside = tmp_path / SET_ASIDE_DIR
    assert restored.set_aside == [str(aside / "3"), str(aside / "2")]
    assert sorted(os.listdir(aside)) == ["2", "3"] and ckpt.latest_step() == 1
    warnings = capsys.readouterr().err
    assert "checkpoint step 3" in warnings and "checkpoint step 2" in warnings
    assert str(aside / "3") in warnings

    # Saving step 3 again and damaging it: the second copy set aside sits beside the first.
    ckpt.save(3, _state(3), {"step": 3})
    ckpt.wait()
    _damage(tmp_path / "checkpoints" / "3")
    assert ckpt.restore_newest(_state(0)).set_aside == [str(aside / "3-2")]
    ckpt.close()


@FAILED_RESTORE_NOISE
def test_restore_newest_stops_when_none_restores_and_moves_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=2)
    for step in (1, 2):
        ckpt.save(step, _state(step), {})
    ckpt.wait()
    for step in ("1", "2"):
        _damage(tmp_path / "checkpoints" / step)
    with pytest.raises(UserError, match=r"no checkpoint in .* restores \(step 2: .*; step 1: "):
        ckpt.restore_newest(_state(0))
    assert checkpoint_steps(tmp_path) == [1, 2] and not (tmp_path / SET_ASIDE_DIR).exists()
    ckpt.close()


def test_prepare_workdir_saves_config_and_finds_the_newest_checkpoint(tmp_path):
    config = load_config(None, ["train.steps=10"])
    assert prepare_workdir(tmp_path / "run", config) is None
    assert load_config(tmp_path / "run" / CONFIG_FILE) == config
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", max_to_keep=2)
    ckpt.save(4, _state(4), {})
    ckpt.save(6, _state(6), {})
    ckpt.close()
    # Run length, logging and checkpoint cadence may change on resume, but the run may not end
    # before its newest checkpoint.
    relogged = load_config(None, ["train.steps=20", "train.log_every=5"])
    assert prepare_workdir(tmp_path / "run", relogged) == 6
    assert load_config(tmp_path / "run" / CONFIG_FILE) == relogged
    assert prepare_workdir(tmp_path / "run", load_config(None, ["train.steps=6"])) == 6
    with pytest.raises(UserError, match=r"already at step 6, past train.steps=5: set .*=6"):
        prepare_workdir(tmp_path / "run", load_config(None, ["train.steps=5"]))


def test_unusable_run_directories_are_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"'.*/file/run' cannot be used: it cannot be created"):
        check_run_directory(tmp_path / "file" / "run")
    with pytest.raises(UserError, match=r"'.*/file' cannot be used: .*another --workdir"):
        check_run_directory(tmp_path / "file")
    check_run_directory(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir()


def test_refuses_to_resume_a_different_config(tmp_path):
    prepare_workdir(tmp_path, load_config())
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=1)
    ckpt.save(1, _state(1), {})
    ckpt.close()
    other = load_config(None, ["model.d_ff=64", "train.learning_rate=1e-4"])
    with pytest.raises(ValueError) as info:
        prepare_workdir(tmp_path, other)
    msg = str(info.value)
    assert "model.d_ff" in msg and "train.learning_rate" in msg and "new workdir" in msg
    assert load_config(tmp_path / CONFIG_FILE) == load_config()  # the saved config is kept
