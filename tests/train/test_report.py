"""jmoe.train.report: peak-FLOPs lookup and MFU, the report PNG, throughput, the closing summary
and its file."""

import math
import types

import numpy as np
import pytest

from jmoe.train import report


def _device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind,platform,peak",
    [
        ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5p", "tpu", 459e12),
        ("TPU v4", "tpu", 275e12),
        ("cpu", "cpu", 1e11),
        ("Some New Chip", "gpu", None),
    ],
)
def test_peak_flops_by_device_kind(kind, platform, peak):
    assert report.peak_flops(_device(kind, platform)) == peak


def test_mfu_is_realised_over_summed_peak():
    devices = [_device("NVIDIA H100"), _device("NVIDIA H100")]
    assert report.mfu(1e9, 2e5, devices) == pytest.approx(1e9 * 2e5 / (2 * 989e12))
    assert report.mfu(1e9, 2e5, [_device("unknown")]) is None


@pytest.mark.parametrize("load_shape", [(2, 4), (2, 2, 4)], ids=["top_k", "chain"])
def test_plot_report_writes_png(tmp_path, load_shape):
    rng = np.random.default_rng(0)
    records = (
        [
            {
                "step": s,
                "loss": None if s == 7 else 5.0 - s / 10,  # a skipped non-finite step logs null
                "bad_steps": int(s == 7),
                "lr": s * 1e-3,
                "aux_loss": 0.01,
                "load_balance_loss": 1.0 + s / 100,
                "z_loss": None if s == 7 else 3.0,
                "tokens_per_expert": rng.integers(1, 9, size=load_shape).tolist(),
                "active_experts": np.full(load_shape[:-1], 2.0).tolist(),
            }
            for s in range(1, 11)
        ]
        + [{"step": 10, "eval_loss": 4.2, "eval_perplexity": 66.7}]
    )
    path = tmp_path / "report.png"
    report.plot_report(records, path, baseline=5.3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.plot_report([{"step": 1, "loss": 3.0}], path, baseline=None)  # a dense model
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_leaves_out_untimed_steps():
    rate = report.Throughput(tokens_per_step=100)
    assert rate.window() is None and rate.overall() is None
    rate.add(0.5)
    rate.add(1.5)
    assert rate.window() == pytest.approx(100.0)  # 200 tokens in 2 s
    assert rate.window() is None  # a new window
    rate.add(0.25)
    assert rate.window() == pytest.approx(400.0)
    assert rate.overall() == pytest.approx(300 / 2.25)


@pytest.mark.parametrize(
    "seconds,text", [(4.25, "4.2 s"), (59.94, "59.9 s"), (151, "2 min 31 s"), (3725, "1 h 02 min")]
)
def test_format_duration(seconds, text):
    assert report.format_duration(seconds) == text


def test_summary_names_loss_baseline_speed_and_outputs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "tensorboard").mkdir()
    final = {
        "step": 500,
        "loss": 2.9,
        "eval_loss": 2.78,
        "eval_perplexity": math.exp(2.78),
        "unigram_loss": 5.35,
        "tokens_per_s": 7912.4,
        "wall_time_s": 151.0,
        "skipped_steps": 2,
    }
    lines = report.summary_lines(final, tmp_path)
    speed = "7,912 tokens/s; 2 non-finite steps skipped"
    assert lines[0] == f"finished step 500 in 2 min 31 s ({speed})"
    assert "held-out loss 2.7800" in lines[1] and "5.3500 for the unigram baseline" in lines[1]
    assert lines[2] == f"outputs in {tmp_path}: metrics.jsonl, tensorboard/, checkpoints/"
    assert "tensorboard --logdir" in lines[3]

    report.save_summary(tmp_path, {**final, "loss": float("nan")})
    assert report.load_summary(tmp_path) == {**final, "loss": None}
    assert report.load_summary(tmp_path / "nowhere") is None
