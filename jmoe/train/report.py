"""What a training run shows: a progress bar, `metrics.jsonl`, an MFU estimate and `report.png`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

# Dense peak FLOP/s per device at the usual training precision (bf16 on accelerators). CPUs have
# no single figure: 1e11 is a rough order of magnitude for a few AVX2/AVX-512 cores in float32.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e ("TPU v5 lite")
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("cpu", 1e11),
)


def peak_flops(device: jax.Device) -> float | None:
    """Peak FLOP/s of one device from `PEAK_FLOPS` by device kind, or None when unknown."""
    kind = f"{device.device_kind} {device.platform}".lower()
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, devices: Sequence[jax.Device]) -> float | None:
    """Model FLOPs utilisation: realised training FLOP/s over the devices' summed peak."""
    peaks = [peak_flops(d) for d in devices]
    if not peaks or None in peaks:
        return None
    return flops_per_token * tokens_per_s / sum(peaks)


class MetricsLog:
    """Appends one JSON object per line to `path` (arrays become lists); a no-op unless
    `enabled` (only the first process writes)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def truncate(self, step: int) -> None:
        """Drops the lines past `step` (logged after the checkpoint a run resumes from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in keep)
        os.replace(tmp, self.path)  # the history is never missing, even after a crash here


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` file, oldest first."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A progress bar over training steps with loss, tokens/s and ETA (tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Prints a line above the bar (or plainly when it is disabled)."""
        tqdm.write(message)

    def close(self) -> None:
        self._bar.close()


def plot_report(records: list[dict], path: str | os.PathLike, baseline: float | None) -> None:
    """Writes a PNG: train / held-out loss against step, and the last logged per-layer share of
    routed tokens per expert as a heatmap (`tokens_per_expert`, layers x experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    loads = [r["tokens_per_expert"] for r in train if "tokens_per_expert" in r]
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out"
        )
    if baseline is not None:
        ax_loss.axhline(baseline, color="gray", linestyle="--", label="unigram (held-out)")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    if loads:
        load_LxE = np.asarray(loads[-1], dtype=np.float64).reshape(len(loads[-1]), -1)
        share_LxE = load_LxE / np.maximum(load_LxE.sum(-1, keepdims=True), 1e-12)
        image = ax_load.imshow(share_LxE, aspect="auto", cmap="viridis")
        ax_load.set_yticks(range(share_LxE.shape[0]))
        fig.colorbar(image, ax=ax_load, label="share of routed tokens")
        ax_load.set(
            xlabel="expert", ylabel="MoE layer", title=f"expert load (step {train[-1]['step']})"
        )
    else:
        ax_load.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        return np.asarray(value).tolist()
    return value
