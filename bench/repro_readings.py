"""What `reproduce.py` reads from an experiment's numbers: per-token correlations, the table's
experiment-specific columns, the one-line reading of each experiment and its plot.

A reading compares variants by their position in the experiment's YAML (the first is the
baseline) and states only what the numbers say. Variants are compared seed by seed (seed i of
every variant shares its data split, data order and initialisation, so a seed's difference
cancels what the seeds share): a difference counts as "lower" or "higher" when the mean of the
per-seed differences exceeds their standard deviation over the seeds, else "within the seed
spread".
"""

from __future__ import annotations

import pathlib

import numpy as np
import scipy.stats


def spearman(loss_N: np.ndarray, experts_N: np.ndarray) -> float | None:
    """Spearman rank correlation of per-token loss and experts (None when either is constant,
    e.g. top-k, where every token runs k experts)."""
    if np.ptp(loss_N) == 0 or np.ptp(experts_N) == 0:
        return None
    return float(scipy.stats.spearmanr(loss_N, experts_N).statistic)


def mean_loss_by_count(loss_N: np.ndarray, experts_N: np.ndarray) -> dict[str, list]:
    """Held-out tokens grouped by their expert count (summed over layers): the counts, the
    tokens in each group and their mean loss."""
    counts = np.unique(experts_N)
    return {
        "experts": counts.tolist(),
        "tokens": [int((experts_N == c).sum()) for c in counts],
        "mean_loss": [float(loss_N[experts_N == c].mean()) for c in counts],
    }


def _mean(row: dict, key: str) -> float:
    return row[key]["mean"]


def paired_difference(a: dict, b: dict, key: str = "eval_loss") -> tuple[float, float]:
    """The mean over seeds of `a - b` for a scalar, and the standard deviation (ddof 1; 0 for
    one seed) of those per-seed differences."""
    diffs_S = np.asarray(a[key]["values"], float) - np.asarray(b[key]["values"], float)
    return float(diffs_S.mean()), float(diffs_S.std(ddof=1)) if diffs_S.size > 1 else 0.0


def compare(a: dict, b: dict, key: str = "eval_loss") -> tuple[float, str]:
    """`a - b` of a scalar (mean of the per-seed differences) and the word for it ("lower",
    "higher", "within the seed spread")."""
    diff, spread = paired_difference(a, b, key)
    if abs(diff) <= spread:
        return diff, "within the seed spread"
    return diff, "lower" if diff < 0 else "higher"


def _rows(result: dict, spec: dict, phase: str = "scratch") -> list[tuple[str, dict | None]]:
    """The phase's variants in the YAML's order, with None for a variant that was not run."""
    variants = spec["variants"] if phase == "scratch" else spec["finetune"]["variants"]
    rows = result["phases"].get(phase, {})
    return [(name, rows.get(name)) for name in variants]


def _loss_sentence(name_a: str, a: dict | None, name_b: str, b: dict | None) -> str:
    missing = [name for name, row in ((name_a, a), (name_b, b)) if row is None]
    if missing:
        return " and ".join(missing) + " not run"
    diff, word = compare(a, b)
    _, spread = paired_difference(a, b)
    return (
        f"{name_a} {_mean(a, 'eval_loss'):.3f} vs {name_b} {_mean(b, 'eval_loss'):.3f} "
        f"({diff:+.3f}, {word}; std of the per-seed differences {spread:.3f})"
    )


def read_adamoe(result: dict, spec: dict) -> str:
    parts = []
    for phase in ("scratch", "finetune"):
        (base_name, base), (null_name, null) = _rows(result, spec, phase)[:2]
        sentence = f"{phase}: held-out loss {_loss_sentence(null_name, null, base_name, base)}"
        if null is not None and base is not None:
            flops = _mean(null, "expert_flops_per_token") / _mean(base, "expert_flops_per_token")
            sentence += (
                f", with {_mean(null, 'experts_per_token'):.2f} true experts per token and "
                f"layer ({flops:.0%} of the baseline's expert FLOPs)"
            )
        parts.append(sentence)
    return "AdaMoE: " + "; ".join(parts) + "."


def read_top_p(result: dict, spec: dict) -> str:
    (base_name, base), *adaptive = _rows(result, spec)
    parts = []
    for name, row in adaptive:
        if row is None:
            parts.append(f"{name} not run")
            continue
        layers = row["experts_per_layer"]
        steps = np.diff(layers)
        order = (
            "decreasing" if all(steps <= 0) else "increasing" if all(steps >= 0) else "not monotone"
        )
        first_more = "more" if layers[0] > layers[-1] else "fewer"
        rho = row["loss_experts_spearman"]
        corr = "n/a" if rho["mean"] is None else f"{rho['mean']:+.3f}"
        parts.append(
            f"held-out loss {_loss_sentence(name, row, base_name, base)}, "
            f"{_mean(row, 'experts_per_token'):.2f} experts per token and layer; the first "
            f"layer uses {first_more} than the last ({layers[0]:.2f} vs {layers[-1]:.2f}, "
            f"{order} over depth); Spearman rho(token loss, experts) = {corr}"
        )
    return "Dynamic top-p: " + "; ".join(parts) + "."


def read_pairs(result: dict, spec: dict) -> str:
    """Consecutive pairs of variants: the second of each pair against the first."""
    rows = _rows(result, spec)
    parts = [
        _loss_sentence(rows[i + 1][0], rows[i + 1][1], rows[i][0], rows[i][1])
        for i in range(0, len(rows) - 1, 2)
    ]
    return f"{result['title']}: held-out loss " + "; ".join(parts) + "."


def mean_load_ratio(row: dict) -> float:
    """The busiest expert's load over the mean, averaged over training steps and seeds."""
    return float(np.mean([np.mean([v for _, v in curve]) for curve in row["load_curve"]]))


def final_load_ratio(row: dict) -> float:
    """The same ratio over the last fifth of training (averaged over seeds)."""
    tails = [[v for _, v in curve][-max(len(curve) // 5, 1) :] for curve in row["load_curve"]]
    return float(np.mean([np.mean(t) for t in tails]))


def read_deepseek(result: dict, spec: dict) -> str:
    (coarse_name, coarse), (lb_name, lb), (bias_name, bias) = _rows(result, spec)[:3]
    loads = [
        f"{name} {mean_load_ratio(row):.2f} / {final_load_ratio(row):.2f}"
        for name, row in ((coarse_name, coarse), (lb_name, lb), (bias_name, bias))
        if row is not None
    ]
    return (
        f"DeepSeek-style: held-out loss {_loss_sentence(lb_name, lb, coarse_name, coarse)}; "
        f"{_loss_sentence(bias_name, bias, lb_name, lb)}; busiest expert over the mean load "
        f"(mean over training / last fifth): {', '.join(loads)}."
    )


def active_tail(row: dict) -> float:
    """Mean active experts per token and layer over the last fifth of training and the seeds."""
    tails = []
    for curve in row["active_curve"]:
        values = [float(np.mean(v)) for _, v in curve]
        tails.append(np.mean(values[-max(len(values) // 5, 1) :]))
    return float(np.mean(tails))


def read_budget(result: dict, spec: dict) -> str:
    parts = []
    for name, row in _rows(result, spec):
        if row is None:
            parts.append(f"{name} not run")
            continue
        target = row["router"]["target_active_experts"]
        tail = active_tail(row)
        parts.append(
            f"{name}: {tail:.2f} active experts per token over the last fifth of training "
            f"(target {target:g}, off by {abs(tail - target) / target:.1%}), held-out "
            f"{_mean(row, 'experts_per_token'):.2f} with a per-token std of "
            f"{_mean(row, 'experts_per_token_std'):.2f}"
        )
    return "Compute budget: " + "; ".join(parts) + "."


READINGS = {
    "adamoe": read_adamoe,
    "top_p": read_top_p,
    "pairs": read_pairs,
    "deepseek": read_deepseek,
    "budget": read_budget,
}


def _layers_cell(row: dict) -> str:
    return " / ".join(f"{x:.2f}" for x in row["experts_per_layer"])


def _rho_cell(row: dict) -> str:
    rho = row["loss_experts_spearman"]
    if rho["mean"] is None:
        return "n/a (constant)"
    return f"{rho['mean']:+.3f}" + (f" ± {rho['std']:.3f}" if len(rho["values"]) > 1 else "")


def _std_cell(row: dict) -> str:
    return f"{_mean(row, 'experts_per_token_std'):.2f}"


EXTRA_COLUMNS = {
    "adamoe": (("per-token experts std", _std_cell), ("experts per layer", _layers_cell)),
    "top_p": (("experts per layer (first to last)", _layers_cell), ("Spearman ρ", _rho_cell)),
    "deepseek": (
        ("max/mean load, training mean", lambda row: f"{mean_load_ratio(row):.2f}"),
        ("max/mean load, last fifth", lambda row: f"{final_load_ratio(row):.2f}"),
    ),
    "budget": (
        ("target", lambda row: f"{row['router']['target_active_experts']:g}"),
        ("active, last fifth of training", lambda row: f"{active_tail(row):.2f}"),
        ("per-token experts std", _std_cell),
    ),
}


def plot(result: dict, spec: dict, path: pathlib.Path) -> None:
    """A 2x2 figure: train loss curves, held-out loss per variant (seed std as error bars), and
    two experiment-specific panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (name if phase == "scratch" else f"{name} (fine-tuned)", row)
        for phase, variants in result["phases"].items()
        for name, row in variants.items()
    ]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax_curve, ax_bar, ax_a, ax_b = axes.ravel()
    for label, row in rows:
        steps, mean_loss = _mean_curve(row["train_curve"])
        ax_curve.plot(steps, mean_loss, label=label)
    ax_curve.set(xlabel="step", ylabel="train cross-entropy", title="training loss (seed mean)")
    ax_curve.legend(fontsize="small")
    labels = [label for label, _ in rows]
    ax_bar.bar(
        range(len(rows)),
        [_mean(r, "eval_loss") for _, r in rows],
        yerr=[r["eval_loss"]["std"] for _, r in rows],
        capsize=4,
    )
    low = min(_mean(r, "eval_loss") - r["eval_loss"]["std"] for _, r in rows)
    high = max(_mean(r, "eval_loss") + r["eval_loss"]["std"] for _, r in rows)
    ax_bar.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    ax_bar.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize="small")
    ax_bar.set(ylabel="held-out cross-entropy", title="held-out loss (error bars: seed std)")
    PANELS.get(spec["reading"], (_flops_panel, _flops_panel))[0](ax_a, rows, result)
    PANELS.get(spec["reading"], (_flops_panel, _flops_panel))[1](ax_b, rows, result)
    fig.suptitle(result["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _mean_curve(curves: list) -> tuple[list, np.ndarray]:
    length = min(len(c) for c in curves)
    steps = [s for s, _ in curves[0][:length]]
    values = np.mean([[np.mean(v) for _, v in c[:length]] for c in curves], axis=0)
    return steps, values


def _flops_panel(ax, rows, result) -> None:
    for label, row in rows:
        ax.errorbar(
            _mean(row, "expert_flops_per_token") / 1e6,
            _mean(row, "eval_loss"),
            yerr=row["eval_loss"]["std"],
            fmt="o",
            label=label,
        )
    ax.set(xlabel="expert MFLOPs per token", ylabel="held-out loss", title="loss vs expert FLOPs")
    ax.legend(fontsize="small")


def _hist_panel(ax, rows, result) -> None:
    for label, row in rows:
        hist = np.asarray(row["expert_count_hist"], np.float64)
        ax.plot(range(len(hist)), hist / hist.sum(), "o-", label=label)
    ax.set(xlabel="experts run for a token in a layer", ylabel="share of (token, layer) pairs")
    ax.set_title("experts per token and layer (held out)")
    ax.legend(fontsize="small")


def _layers_panel(ax, rows, result) -> None:
    for label, row in rows:
        layers = row["experts_per_layer"]
        ax.plot(range(len(layers)), layers, "o-", label=label)
    ax.set(xlabel="MoE layer", ylabel="experts per token", title="experts per layer (held out)")
    ax.legend(fontsize="small")


def _loss_by_experts_panel(ax, rows, result) -> None:
    for label, row in rows:
        groups = row["loss_by_experts"][0]
        if len(groups["experts"]) > 1:
            ax.plot(groups["experts"], groups["mean_loss"], "o-", label=f"{label} (seed 0)")
    ax.set(xlabel="experts for a token (sum over layers)", ylabel="mean token loss")
    ax.set_title("token loss by experts used (held out)")
    ax.legend(fontsize="small")


def _load_panel(ax, rows, result) -> None:
    for label, row in rows:
        steps, ratio = _mean_curve(row["load_curve"])
        ax.plot(steps, ratio, label=label)
    ax.axhline(1.0, color="gray", linestyle="--", label="perfect balance")
    ax.set(xlabel="step", ylabel="busiest / mean expert load", title="load imbalance (training)")
    ax.legend(fontsize="small")


def _active_panel(ax, rows, result) -> None:
    for label, row in rows:
        steps, active = _mean_curve(row["active_curve"])
        (line,) = ax.plot(steps, active, label=label)
        ax.axhline(row["router"]["target_active_experts"], color=line.get_color(), ls="--")
    ax.set(xlabel="step", ylabel="active experts per token (layer mean)")
    ax.set_title("budget controller (dashed: targets)")
    ax.legend(fontsize="small")


PANELS = {
    "adamoe": (_hist_panel, _layers_panel),
    "top_p": (_layers_panel, _loss_by_experts_panel),
    "deepseek": (_load_panel, _flops_panel),
    "budget": (_active_panel, _hist_panel),
}
