"""jmoe.report: metrics.jsonl round trip, peak-FLOPs lookup and MFU, and the report PNG."""

import types

import numpy as np
import pytest

from jmoe.train import report


def _device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_metrics_log_round_trip_and_disabled(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = report.MetricsLog(path)
    log.write({"step": 1, "loss": np.float32(2.5), "tokens_per_expert": np.ones((2, 3))})
    log.write({"step": 2, "eval_loss": 2.0})
    report.MetricsLog(path, enabled=False).write({"step": 3})
    assert report.read_metrics(path) == [
        {"step": 1, "loss": 2.5, "tokens_per_expert": [[1.0] * 3] * 2},
        {"step": 2, "eval_loss": 2.0},
    ]


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
    records = [
        {"step": s, "loss": 5.0 - s / 10, "tokens_per_expert": np.ones(load_shape).tolist()}
        for s in range(1, 11)
    ] + [{"step": 10, "eval_loss": 4.2, "eval_perplexity": 66.7}]
    path = tmp_path / "report.png"
    report.plot_report(records, path, baseline=5.3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
