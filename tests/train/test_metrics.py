"""jmoe.train.metrics: metrics.jsonl stays strict JSON (non-finite as null) and truncates on
resume; dashboard tags; TensorBoard event files read back; Weights & Biases through a stand-in
module (the real one is not a test dependency)."""

import json
import struct
import sys
import types

import numpy as np
import pytest
from run_cases import strict_records
from tensorboardX.proto import event_pb2

from jmoe.train import metrics
from jmoe.train.errors import UserError
from jmoe.train.run_config import load_config


def test_metrics_log_writes_strict_json_and_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    log.write({"step": 1, "loss": np.float32(2.5), "tokens_per_expert": np.ones((2, 3))})
    log.write({"step": 2, "loss": np.float32("nan"), "grad_norm": float("inf"), "mfu": None})
    log.write({"step": 2, "eval_loss": 2.0, "per_layer": [1.0, float("-inf")]})
    log.write({"step": 3, "loss": 1.0})
    metrics.MetricsLog(path, enabled=False).write({"step": 4})
    want = [
        {"step": 1, "loss": 2.5, "tokens_per_expert": [[1.0] * 3] * 2},
        {"step": 2, "loss": None, "grad_norm": None, "mfu": None},
        {"step": 2, "eval_loss": 2.0, "per_layer": [1.0, None]},
        {"step": 3, "loss": 1.0},
    ]
    assert strict_records(path) == metrics.read_metrics(path) == want
    log.truncate(2)
    assert strict_records(path) == want[:3]


def test_series_tags_scalars_and_per_layer_stats():
    record = {
        "step": 5,
        "loss": 2.0,
        "mfu": None,
        "eval_loss": 1.5,
        "active_experts": [2.0, 1.5],
        "tokens_per_expert": [[3.0, 1.0], [2.0, 2.0]],
    }
    got = dict(metrics.series(record))
    np.testing.assert_allclose(got.pop("expert_load/layer_0"), [0.75, 0.25])
    np.testing.assert_allclose(got.pop("expert_load/layer_1"), [0.5, 0.5])
    assert got == {
        "train/loss": 2.0,
        "eval/loss": 1.5,
        "active_experts/layer_0": 2.0,
        "active_experts/layer_1": 1.5,
        "expert_load_max_violation/layer_0": pytest.approx(0.5),  # 0.75 / 0.5 - 1
        "expert_load_max_violation/layer_1": 0.0,
    }
    chain = dict(metrics.series({"step": 1, "tokens_per_expert": np.ones((1, 2, 4))}))
    assert set(chain) == {
        f"{name}/layer_0_step_{c}"
        for name in ("expert_load", "expert_load_max_violation")
        for c in (0, 1)
    }


def _events(directory):
    """Every Event of the TFRecord files in `directory` (length, crc, data, crc per record)."""
    events = []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


def _record(step, loss):
    return {"step": step, "loss": loss, "tokens_per_expert": [[1.0, 3.0]], "lr": 1e-3}


def test_tensorboard_event_files_hold_scalars_and_histograms(tmp_path):
    config = load_config(None, ["train.steps=5"])
    writers = metrics.open_metrics(str(tmp_path), config, start_step=0, enabled=True)
    for step in (1, 2):
        writers.write(_record(step, 3.0 - step))
    writers.write({"step": 2, "eval_loss": 1.25})
    writers.close()
    summaries = [(e.step, v) for e in _events(tmp_path / "tensorboard") for v in e.summary.value]
    scalars = {(step, v.tag): v.simple_value for step, v in summaries if v.HasField("simple_value")}
    assert scalars[(1, "train/loss")] == 2.0 and scalars[(2, "train/loss")] == 1.0
    assert scalars[(2, "eval/loss")] == 1.25
    assert scalars[(1, "train/lr")] == pytest.approx(1e-3)
    histograms = {(step, v.tag) for step, v in summaries if v.HasField("histo")}
    assert histograms == {(1, "expert_load/layer_0"), (2, "expert_load/layer_0")}
    assert strict_records(tmp_path / "metrics.jsonl")[-1] == {"step": 2, "eval_loss": 1.25}
    assert metrics.open_metrics(str(tmp_path), config, 0, enabled=False).writers == []


class FakeWandb(types.ModuleType):
    """Records what a run logs, like `wandb` would send it."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_logs_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = load_config(None, ["train.wandb_project=moe-runs"])
    for start in (0, 1):
        writers = metrics.open_metrics(str(tmp_path), config, start_step=start, enabled=True)
        writers.write(_record(start + 1, 2.0))
        writers.close()
    first, second = fake.runs
    assert first.kwargs["project"] == "moe-runs" and first.kwargs["resume"] == "allow"
    assert first.kwargs["id"] == second.kwargs["id"]  # the run directory keeps the W&B id
    assert first.kwargs["config"]["train"]["wandb_project"] == "moe-runs"
    step, logged = first.logged[0]
    assert step == 1 and logged["train/loss"] == 2.0
    assert logged["expert_load_max_violation/layer_0"] == pytest.approx(0.5)
    assert not any(isinstance(v, (list, np.ndarray)) for v in logged.values())
    assert first.finished and second.finished
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_wandb_asked_for_but_not_installed_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match="train.wandb_project='x' needs Weights & Biases: pip"):
        metrics.check_wandb(load_config(None, ["train.wandb_project=x"]).train)
    metrics.check_wandb(load_config().train)  # not asked for: nothing to check
