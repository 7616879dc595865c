"""jmoe.train.run: whole runs on a small real text. The loss falls below the unigram baseline and
the run directory is complete; a crashed run resumes exactly; a diverging run stops with valid
metrics, a report and finite weights kept; a finished run says so at once, and a larger
train.steps continues it at the final learning rate, past a damaged newest checkpoint."""

import os

import jax
import numpy as np
import pytest
from run_cases import RESUMED, RUN, losses, strict_records

from jmoe.lm.model import Transformer
from jmoe.train import checkpoint, run, trainer
from jmoe.train.run_config import load_config


def _config(corpus, extra=()):
    return load_config(None, [*RUN, f"data.source={corpus}", *extra])


def _run(corpus, workdir, extra=()):
    return run.train_and_evaluate(_config(corpus, extra), workdir)


def test_loss_falls_below_unigram_and_writes_the_run_directory(corpus, tmp_path):
    final = _run(corpus, tmp_path, ["train.steps=60", "train.eval_every=30", "train.plot=true"])
    steps, values = zip(*losses(tmp_path), strict=True)
    assert steps == tuple(range(1, 61)) and final["step"] == 60
    assert np.mean(values[-5:]) < values[0] - 1.0, values
    assert final["eval_loss"] < final["unigram_loss"], final
    assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]))
    assert final["tokens_per_s"] > 0 and final["skipped_steps"] == 0
    outputs = ("config.yaml", "metrics.jsonl", "report.png", "tokenizer", "checkpoints")
    for name in (*outputs, "tensorboard", "summary.json"):
        assert os.path.exists(tmp_path / name), name
    assert os.listdir(tmp_path / "tensorboard")
    record = strict_records(tmp_path / "metrics.jsonl")[-2]
    assert np.asarray(record["tokens_per_expert"]).shape == (2, 8)
    assert len(record["router_entropy"]) == 2 and record["mfu"] > 0 and record["param_norm"] > 0
    assert not os.path.exists(tmp_path / "run.holder.json")  # the lock was released


def test_crashed_run_resumes_exactly(corpus, reference_run, tmp_path, monkeypatch):
    reference_dir, reference = reference_run
    make_iterator = run.data.make_iterator

    class KilledAfter5Batches:  # the process dies while step 6 waits for its batch
        def __init__(self, iterator):
            self.iterator, self.batches = iterator, 0

        def __next__(self):
            self.batches += 1
            if self.batches == 6:
                raise KeyboardInterrupt
            return next(self.iterator)

        def get_state(self):
            return self.iterator.get_state()

    def make_killed(*args, shuffle=True, **kwargs):
        iterator = make_iterator(*args, shuffle=shuffle, **kwargs)
        return KilledAfter5Batches(iterator) if shuffle else iterator

    monkeypatch.setattr(run.data, "make_iterator", make_killed)
    with pytest.raises(KeyboardInterrupt):
        _run(corpus, tmp_path, RESUMED)
    monkeypatch.undo()
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]
    resumed = _run(corpus, tmp_path, RESUMED)  # from the checkpoint of step 4
    assert losses(tmp_path) == losses(reference_dir)
    assert resumed["eval_loss"] == reference["eval_loss"]

    with pytest.raises(ValueError, match=r"model.moe.d_ff.*new workdir"):
        _run(corpus, tmp_path, [*RESUMED, "model.moe.d_ff=16"])


def test_divergence_stops_with_valid_metrics_a_report_and_finite_weights(corpus, tmp_path):
    extra = [
        "train.steps=30",
        "train.learning_rate=1e30",
        "train.warmup_steps=0",
        "train.grad_clip=null",
        "train.max_bad_steps=3",
        "train.checkpoint_every=1",
        "train.plot=true",
    ]
    with pytest.raises(run.Diverged) as info:
        _run(corpus, tmp_path, extra)
    records = strict_records(tmp_path / "metrics.jsonl")  # no bare NaN
    bad = [(r["step"], r["bad_steps"]) for r in records if "bad_steps" in r]
    first_bad = min(step for step, count in bad if count)
    assert bad[-3:] == [(first_bad, 1), (first_bad + 1, 2), (first_bad + 2, 3)]
    assert any(r["loss"] is None or r["grad_norm"] is None for r in records if r["bad_steps"])
    message = str(info.value)
    assert "3 non-finite steps in a row" in message
    assert f"The last good step is {first_bad - 1}" in message
    assert "train.learning_rate=1e+29" in message and "new run directory" in message
    assert os.path.exists(tmp_path / "report.png")

    saved = checkpoint.checkpoint_steps(tmp_path)
    assert saved[-1] == first_bad - 1  # the last good step's checkpoint is kept ...
    config = _config(corpus, extra)
    tx = trainer.make_optimizer(config.train)
    target = trainer.init_state(config, Transformer(config.model), tx)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", max_to_keep=1)
    state, _ = ckpt.restore(target)
    ckpt.close()
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.moe_state)):
        assert np.isfinite(np.asarray(leaf)).all()  # ... and holds no Inf or NaN


# The damaged checkpoint's failed restore leaves an orbax callback for a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_finished_run_says_so_and_more_steps_continue_past_a_damaged_checkpoint(
    corpus, tmp_path, monkeypatch, capsys
):
    base = ["data.batch_size=1", "train.checkpoint_every=4", "train.eval_every=4"]
    first = _run(corpus, tmp_path, [*base, "train.steps=8"])
    lr = {r["step"]: r["lr"] for r in strict_records(tmp_path / "metrics.jsonl") if "lr" in r}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run read its data or evaluated again")

    monkeypatch.setattr(run, "prepare_data", no_work)
    monkeypatch.setattr(run, "evaluate", no_work)
    capsys.readouterr()
    again = _run(corpus, tmp_path, [*base, "train.steps=8"])
    assert again == first  # the saved summary
    assert "already finished step 8" in capsys.readouterr().out
    monkeypatch.undo()

    for path in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data files
            path.write_bytes(path.read_bytes()[:8])
    more = _run(corpus, tmp_path, [*base, "train.steps=12"])
    out = capsys.readouterr()
    assert "checkpoint step 8" in out.err and "set aside" in out.err
    assert os.path.isdir(tmp_path / checkpoint.SET_ASIDE_DIR / "8")
    assert "resuming from the checkpoint of step 4" in out.out
    assert "steps 9 to 12 train at the final learning rate" in out.out
    assert more["step"] == 12 and checkpoint.checkpoint_steps(tmp_path)[-1] == 12

    records = strict_records(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in records if "lr" in r]
    assert steps == list(range(1, 13))  # steps 5 to 8 trained again, once each in the log
    config = _config(corpus, [*base, "train.steps=12"])
    final_lr = config.train.learning_rate * config.train.final_lr_fraction
    new_lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert [new_lr[s] for s in range(1, 9)] == [lr[s] for s in range(1, 9)]
    assert [new_lr[s] for s in range(9, 13)] == pytest.approx([final_lr] * 4)
