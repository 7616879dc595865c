"""What a training run shows: status lines, a progress bar, an MFU estimate, `report.png` and
the closing summary (also saved as `summary.json`)."""

from __future__ import annotations

import json
import math
import os
import sys
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


class Progress:
    """A progress bar over training steps with loss, tokens/s and ETA (tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")

    def update(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        tok_s = "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=tok_s, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def status(message: str) -> None:
    """Prints a line about the run (above the progress bar when one is shown)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def warn(message: str) -> None:
    """Prints "warning: message" on standard error (above the progress bar)."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


SUMMARY_FILE = "summary.json"
# What a run directory holds, in the order the summary lists it.
OUTPUTS = (
    "report.png",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "tokenizer",
    "config.yaml",
    SUMMARY_FILE,
)


def save_summary(workdir: str | os.PathLike, final: dict) -> None:
    """Writes a finished run's final metrics to `workdir/summary.json` (non-finite as null)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    clean = {
        k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in final.items()
    }
    with open(f"{path}.tmp", "w") as f:
        json.dump(clean, f, indent=1)
    os.replace(f"{path}.tmp", path)


def load_summary(workdir: str | os.PathLike) -> dict | None:
    """The final metrics `save_summary` wrote, or None."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary_lines(final: dict, workdir: str | os.PathLike) -> list[str]:
    """The closing lines of a run: steps, time and throughput; held-out loss against the
    unigram baseline; where the outputs are."""
    tokens_per_s = final.get("tokens_per_s")
    speed = f"{tokens_per_s:,.0f} tokens/s" if tokens_per_s else "no timed steps"
    skipped = final.get("skipped_steps") or 0
    skipped_note = f"; {skipped} non-finite steps skipped" if skipped else ""
    lines = [
        f"finished step {final['step']} in {format_duration(final['wall_time_s'])} "
        f"({speed}{skipped_note})"
    ]
    if final.get("eval_loss") is not None:
        lines.append(
            f"held-out loss {final['eval_loss']:.4f} nats/token (perplexity "
            f"{final['eval_perplexity']:.2f}) against {final['unigram_loss']:.4f} for the "
            "unigram baseline"
        )
    present = [name for name in OUTPUTS if os.path.exists(os.path.join(workdir, name))]
    shown = [f"{name}/" if os.path.isdir(os.path.join(workdir, name)) else name for name in present]
    lines.append(f"outputs in {os.fspath(workdir)}: {', '.join(shown)}")
    if "tensorboard" in present:
        lines.append(f"watch with: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    return lines


def format_duration(seconds: float) -> str:
    """`seconds` as "42.0 s", "2 min 31 s" or "1 h 02 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# The MoE losses a step logs: the weighted sum added to the loss, and each unscaled term.
AUX_LOSSES = ("aux_loss", "load_balance_loss", "z_loss", "seq_balance_loss")


def plot_report(records: list[dict], path: str | os.PathLike, baseline: float | None) -> None:
    """Writes a PNG of a run's `metrics.jsonl` records: train and held-out loss (skipped
    non-finite steps marked), learning rate, auxiliary losses; per MoE layer the busiest and
    idlest expert's share of routed tokens over training against the even share, active
    experts per token over training, and the last logged load of every expert (a heatmap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ((ax_loss, ax_lr, ax_aux), (ax_load, ax_active, ax_heat)) = plt.subplots(
        2, 3, figsize=(17, 9)
    )
    _plot_loss(ax_loss, train, evals, baseline)
    _plot_scalars(ax_lr, train, ("lr",), "learning rate")
    _plot_scalars(ax_aux, train, AUX_LOSSES, "auxiliary losses (aux_loss is what is added)")
    _plot_load_over_time(ax_load, train)
    _plot_per_layer(ax_active, train, "active_experts", "active experts per token")
    _plot_last_load(fig, ax_heat, train)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _values(records: list[dict], key: str) -> tuple[list[int], np.ndarray]:
    """Steps and float values of `key` (null, i.e. non-finite, as NaN: a gap in the line)."""
    rows = [r for r in records if key in r]
    values = [np.nan if r[key] is None else r[key] for r in rows]
    return [r["step"] for r in rows], np.asarray(values, np.float64)


def _plot_loss(ax, train: list[dict], evals: list[dict], baseline: float | None) -> None:
    ax.plot(*_values(train, "loss"), label="train")
    if evals:
        ax.plot(*_values(evals, "eval_loss"), "o-", label="held-out")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="unigram (held-out)")
    skipped = [r["step"] for r in train if r.get("bad_steps")]
    for i, step in enumerate(skipped):
        ax.axvline(step, color="red", alpha=0.3, label="skipped (non-finite)" if i == 0 else None)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()


def _plot_scalars(ax, train: list[dict], keys: Sequence[str], title: str) -> None:
    drawn = [key for key in keys if any(r.get(key) is not None for r in train)]
    for key in drawn:
        ax.plot(*_values(train, key), label=key)
    values = np.concatenate([_values(train, key)[1] for key in drawn] or [np.zeros(0)])
    finite = values[np.isfinite(values)]
    if len(drawn) > 1 and finite.size and finite.min() > 0:
        ax.set_yscale("log")  # the terms differ by orders of magnitude
    ax.set(xlabel="step", title=title)
    if len(drawn) > 1:
        ax.legend()


def _load_shares(train: list[dict]):
    """Steps, `[N, R, E]` shares of routed tokens per expert and the R row labels (MoE layers,
    or layers x chain steps), or None when no step logged expert loads."""
    rows = [r for r in train if r.get("tokens_per_expert") is not None]
    if not rows:
        return None
    load = np.stack([np.asarray(r["tokens_per_expert"], np.float64) for r in rows])
    load_NxRxE = load.reshape(len(rows), -1, load.shape[-1])
    share_NxRxE = load_NxRxE / np.maximum(load_NxRxE.sum(-1, keepdims=True), 1e-12)
    return [r["step"] for r in rows], share_NxRxE, _row_labels(load.shape[1:-1])


def _row_labels(shape: tuple[int, ...]) -> list[str]:
    """Labels of per-layer rows: "layer i", or "layer i step c" with chain steps."""
    rows = np.ndindex(*shape)
    return [f"layer {index[0]}" + "".join(f" step {c}" for c in index[1:]) for index in rows]


def _plot_load_over_time(ax, train: list[dict]) -> None:
    loads = _load_shares(train)
    if loads is None:
        ax.set_axis_off()
        return
    steps, share_NxRxE, labels = loads
    colors = _colors(len(labels))
    for row, (label, color) in enumerate(zip(labels, colors, strict=True)):
        ax.plot(steps, share_NxRxE[:, row].max(-1), color=color, label=label)
        ax.plot(steps, share_NxRxE[:, row].min(-1), color=color, linestyle=":")
    ax.axhline(1 / share_NxRxE.shape[-1], color="black", linestyle="--", label="even share")
    ax.set(
        xlabel="step",
        ylabel="share of routed tokens",
        title="expert load per MoE layer: busiest (solid), idlest (dotted)",
    )
    ax.legend(fontsize="small", ncol=2 if len(labels) > 6 else 1)


def _plot_per_layer(ax, train: list[dict], key: str, title: str) -> None:
    rows = [r for r in train if r.get(key) is not None]
    if not rows:
        ax.set_axis_off()
        return
    value = np.stack([np.asarray(r[key], np.float64) for r in rows])
    value_NxR = value.reshape(len(rows), -1)
    labels = _row_labels(value.shape[1:])
    for row, (label, color) in enumerate(zip(labels, _colors(len(labels)), strict=True)):
        ax.plot([r["step"] for r in rows], value_NxR[:, row], color=color, label=label)
    ax.set(xlabel="step", title=title)
    ax.legend(fontsize="small", ncol=2 if len(labels) > 6 else 1)


def _plot_last_load(fig, ax, train: list[dict]) -> None:
    loads = _load_shares(train)
    if loads is None:
        ax.set_axis_off()
        return
    steps, share_NxRxE, labels = loads
    image = ax.imshow(share_NxRxE[-1], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    ax.set(xlabel="expert", title=f"expert load (step {steps[-1]})")


def _colors(n: int) -> list:
    """`n` line colours (a qualitative map, cycled past its size)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


class Throughput:
    """Tokens per second over timed steps (the first, compiling step is left out by the caller):
    since the last `window()` call, and over the whole session."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._window = [0, 0.0]  # steps, seconds
        self._total = [0, 0.0]

    def add(self, seconds: float) -> None:
        for tally in (self._window, self._total):
            tally[0] += 1
            tally[1] += seconds

    def window(self) -> float | None:
        """Tokens/s since the previous call (None when no step was timed); starts a new window."""
        rate = self._rate(self._window)
        self._window = [0, 0.0]
        return rate

    def overall(self) -> float | None:
        return self._rate(self._total)

    def _rate(self, tally: list) -> float | None:
        steps, seconds = tally
        return steps * self.tokens_per_step / seconds if steps and seconds > 0 else None
