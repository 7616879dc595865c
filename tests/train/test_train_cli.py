"""train.py: a SIGTERM'd run saves its step and a rerun reproduces the uninterrupted losses; a
held run directory is refused naming the holder; user errors end in one short line (status 2)
and never a traceback; overrides go anywhere on the command line; the run directory follows the
preset's name."""

import importlib.util
import re
import signal
import time

import pytest
from run_cases import REPO, RESUMED, RUN, lock_holder, losses, run_cli, train_cli

from jmoe.train.checkpoint import checkpoint_steps
from jmoe.train.preemption import RunStopped
from jmoe.train.run import Diverged

_spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
train_cli_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli_module)


def _wait_for_step(process, metrics_path, step, timeout=240):
    deadline = time.monotonic() + timeout
    while not (metrics_path.exists() and f'"step": {step},' in metrics_path.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no step in time"
        time.sleep(0.01)


def test_sigterm_saves_the_step_and_the_rerun_matches_the_uninterrupted_run(
    corpus, reference_run, tmp_path
):
    reference_dir, _ = reference_run
    args = [*RUN, f"data.source={corpus}", "--workdir", str(tmp_path), *RESUMED]
    process = train_cli(*args)
    _wait_for_step(process, tmp_path / "metrics.jsonl", 2)
    process.send_signal(signal.SIGSTOP)  # hold it mid-run so the signal lands before the end
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    match = re.search(r"^stopped at step (\d+); rerun the same command to resume$", out, re.M)
    step = int(match.group(1))
    assert 2 <= step < 24
    assert checkpoint_steps(tmp_path)[-1] == step
    assert [s for s, _ in losses(tmp_path)] == list(range(1, step + 1))

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from the checkpoint of step {step}" in rerun.stdout
    assert losses(tmp_path) == losses(reference_dir)
    summary = rerun.stdout[rerun.stdout.index("finished step 24") :]
    assert "against" in summary and "unigram baseline" in summary
    assert f"outputs in {tmp_path}: report.png" not in summary  # train.plot=false
    assert "metrics.jsonl, tensorboard/, checkpoints/, tokenizer/, config.yaml" in summary


def test_held_run_directory_is_refused_naming_the_holder(tmp_path):
    holder = lock_holder(tmp_path)
    try:
        second = run_cli("--workdir", str(tmp_path), "train.steps=5", timeout=120)
    finally:
        holder.kill()
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: run directory '{tmp_path}' is in use by process {holder.pid}")


def test_yaml_error_from_the_command_line_is_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [3\n")
    result = run_cli("--config", str(broken), timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {broken}:3:1: YAML syntax error")
    assert len(result.stderr.strip().splitlines()) == 1


def _user_error_cases(tmp_path, corpus):
    (tmp_path / "a_file").write_text("")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: 64\n  moe: {d_ff: 1\n")
    tiny = [*RUN, f"data.source={corpus}", "--workdir", str(tmp_path / "run")]
    return {
        "yaml syntax": (["--config", str(broken)], f"{broken}:4:1: YAML syntax error"),
        "config file missing": (["--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        "unknown key": (["train.step=3"], "did you mean 'train.steps'"),
        "bad value": (["train.learning_rate=-1"], "TrainConfig.learning_rate=-1.0"),
        "workdir under a file": (
            ["--workdir", str(tmp_path / "a_file" / "run")],
            "cannot be used: it cannot be created (Not a directory",
        ),
        "missing data": ([*tiny, "data.source=/nowhere/at/all.txt"], "does not exist"),
        "batch larger than the data": ([*tiny, "data.batch_size=100000"], "fewer than 100000"),
        "vocabulary too small": ([*tiny, "model.vocab_size=100"], "model.vocab_size=257 or"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "yaml syntax",
        "config file missing",
        "unknown key",
        "bad value",
        "workdir under a file",
        "missing data",
        "batch larger than the data",
        "vocabulary too small",
    ],
)
def test_user_errors_are_one_short_line(case, tmp_path, corpus, capsys):
    argv, fragment = _user_error_cases(tmp_path, corpus)[case]
    with pytest.raises(SystemExit) as info:
        train_cli_module.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and fragment in line, line
    assert len(line) < 400


def _fake_final(**extra):
    final = dict(step=3, loss=2.0, eval_loss=2.1, eval_perplexity=8.2, unigram_loss=5.0)
    return {**final, "tokens_per_s": 100.0, "wall_time_s": 1.0, "skipped_steps": 0, **extra}


def test_overrides_go_anywhere_and_the_workdir_follows_the_preset(monkeypatch, capsys):
    calls = []

    def fake_train(config, workdir):
        calls.append((config, workdir))
        return _fake_final()

    monkeypatch.setattr(train_cli_module, "train_and_evaluate", fake_train)
    small = str(REPO / "configs" / "small.yaml")
    before, after = ["train.steps=7", "--config", small], ["--workdir", "x", "train.plot=false"]
    train_cli_module.main([*before, "data.seq_len=32", *after])
    config, workdir = calls[-1]
    assert (config.train.steps, config.data.seq_len, config.train.plot, workdir) == (
        7,
        32,
        False,
        "x",
    )
    assert config.model.d_model == 512  # the preset's
    train_cli_module.main(["--config", small])
    assert calls[-1][1] == "runs/small"
    train_cli_module.main([])
    assert calls[-1][1] == "runs/tiny"
    assert "finished step 3 in 1.0 s (100 tokens/s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "raised,status,fragment",
    [
        (RunStopped(5, signal.SIGTERM), 143, "stopped at step 5; rerun the same command"),
        (RunStopped(5, signal.SIGINT), 130, "stopped at step 5; rerun the same command"),
        (KeyboardInterrupt(), 130, "interrupted; rerun the same command"),
        (Diverged("10 non-finite steps in a row"), 1, "error: 10 non-finite steps"),
    ],
    ids=["sigterm", "sigint", "ctrl-c-before-a-step", "diverged"],
)
def test_how_a_run_ends_sets_the_exit_status(raised, status, fragment, monkeypatch, capsys):
    def fake_train(config, workdir):
        raise raised

    monkeypatch.setattr(train_cli_module, "train_and_evaluate", fake_train)
    with pytest.raises(SystemExit) as info:
        train_cli_module.main(["--workdir", "unused"])
    assert info.value.code == status
    captured = capsys.readouterr()
    assert fragment in captured.out + captured.err and "Traceback" not in captured.err
