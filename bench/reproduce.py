"""Small-scale reproductions of the routing papers' claims on the tiny LM and the embedded corpus.

Each experiment is a YAML file in configs/experiments/: its variants are config overrides on one
shared base (configs/tiny.yaml plus the mode's run settings), trained from scratch with
`train_and_evaluate` for the same tokens, steps and seeds (AdaMoE adds a fine-tuning phase that
starts from a trained variant's checkpoint). For every variant and seed it reads the run's
summary and metrics.jsonl and the per-token held-out statistics (`jmoe.train.token_stats`), then
writes per experiment `<name>.json`, `<name>.md` (the comparison table and a one-line reading
computed from the numbers) and `<name>.png` into `--out`, and prints the table and the reading.

    python bench/reproduce.py --quick                # every experiment, CPU settings
    python bench/reproduce.py --quick --only top_p   # one experiment
    python bench/reproduce.py                        # longer runs, more seeds
    python bench/reproduce.py --render --out DIR     # tables and plots again from DIR's JSON

Runs are cached in `--runs` by a hash of their config: a finished run (and what was measured on
it) is read back, not retrained, so experiments that share a variant (the top-2 baseline) train
it once, and a rerun with more seeds trains only the new ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np
import repro_readings
import yaml
from results_io import write_results

from jmoe.lm.model import Transformer
from jmoe.moe.layer import with_null_experts
from jmoe.moe.stats import mlp_matrix_count
from jmoe.train import metrics, report, token_stats
from jmoe.train.config import Config
from jmoe.train.run import load_state, train_and_evaluate
from jmoe.train.run_config import config_to_dict, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO / "configs" / "experiments"
BASE_PRESET = REPO / "configs" / "tiny.yaml"
MEASURED_FILE = "reproduce_measured.json"  # a run's numbers, beside its summary.json
RUN_SETTINGS = ["train.progress=false", "train.plot=false", "train.checkpoint_every=100000"]


@dataclasses.dataclass(frozen=True)
class Mode:
    """Run settings shared by every variant of every experiment.

    Attributes:
      name: "quick" or "full" (experiments name their seeds and fine-tuning steps per mode).
      overrides: config overrides on the base preset (tokens, steps, evaluation).
      seeds: seeds per experiment unless the experiment names its own for this mode.
      finetune_scale: factor on the experiments' fine-tuning steps.
    """

    name: str
    overrides: tuple[str, ...]
    seeds: int
    finetune_scale: float = 1.0


QUICK = Mode(
    "quick",
    (
        "data.max_bytes=2000000",
        "data.eval_fraction=0.05",
        "data.seq_len=64",
        "data.batch_size=16",
        "train.steps=150",
        "train.warmup_steps=15",
        "train.log_every=5",
        "train.eval_every=50",
        "train.eval_batches=16",
    ),
    seeds=2,
)
FULL = Mode(
    "full",
    (
        "data.eval_fraction=0.05",
        "train.steps=600",
        "train.log_every=10",
        "train.eval_every=100",
        "train.eval_batches=32",
    ),
    seeds=3,
)


def scaled(mode: Mode, steps: int) -> Mode:
    """`mode` with `steps` training steps: warmup and evaluation spacing scale alike, and
    `run_experiment` scales the fine-tuning steps by `steps / mode_steps`."""
    base = load_config(BASE_PRESET, mode.overrides).train
    ratio = steps / base.steps
    overrides = (
        *mode.overrides,
        f"train.steps={steps}",
        f"train.warmup_steps={max(round(base.warmup_steps * ratio), 1)}",
        f"train.eval_every={max(round(base.eval_every * ratio), 1)}",
    )
    return dataclasses.replace(mode, overrides=overrides, finetune_scale=ratio)


def load_experiment(name: str) -> dict:
    """The experiment `configs/experiments/<name>.yaml` as a dict (with its `name`)."""
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        raise SystemExit(f"no experiment {name!r}: choose one of {known}")
    spec = yaml.safe_load(path.read_text())
    return {"name": name, **spec}


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _config(mode: Mode, spec: dict, overrides, seed: int, steps: int | None = None) -> Config:
    extra = [f"train.seed={seed}", f"data.seed={seed}"]
    if steps is not None:
        extra += [f"train.steps={steps}", f"train.eval_every={steps}"]
    every = [*mode.overrides, *RUN_SETTINGS, *spec.get("overrides", []), *overrides, *extra]
    return load_config(BASE_PRESET, every)


def run_dir(runs: pathlib.Path, config: Config, start_from: str | None) -> pathlib.Path:
    """The cache directory of a run: a hash of its config and of the run it starts from."""
    key = yaml.safe_dump({"config": config_to_dict(config), "from": start_from})
    return runs / hashlib.sha256(key.encode()).hexdigest()[:16]


def converted_params(params: dict, config: Config) -> dict:
    """A trained model's params for `config`: every MoE layer's router gains the null-expert
    columns `config`'s router has beyond the trained one (`with_null_experts`)."""
    wanted = config.model.moe.num_router_outputs
    converted = {}
    for name, layer in params.items():
        if isinstance(layer, dict) and "moe" in layer:
            have = layer["moe"]["router"]["kernel"].shape[-1]
            layer = {**layer, "moe": with_null_experts(layer["moe"], wanted - have)}
        converted[name] = layer
    return converted


def parameter_counts(config: Config, active_experts_L: np.ndarray) -> dict:
    """Total parameters and parameters used per token: the routed experts count with the share
    of them a token runs per layer (`active / E`), everything else in full."""
    model = Transformer(config.model)
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), np.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    moe_names = [n for n, layer in shapes.items() if isinstance(layer, dict) and "moe" in layer]
    moe_names.sort(key=lambda n: int(n.split("_")[-1]))
    inactive = 0.0
    for name, active in zip(moe_names, active_experts_L, strict=True):
        weights = jax.tree.leaves(shapes[name]["moe"]["experts"])
        experts = sum(int(np.prod(x.shape)) for x in weights)
        inactive += experts * (1 - active / config.model.moe.num_experts)
    return {"total_params": total, "active_params": total - inactive}


def expert_flops(config: Config, active_experts_L: np.ndarray) -> float:
    """Forward FLOPs per token of the routed and shared experts, summed over MoE layers (the
    layers' `expert_flops_per_token` rule at the measured active experts)."""
    moe = config.model.moe
    per_unit = 2 * config.model.d_model * mlp_matrix_count(moe.activation)
    shared = moe.shared_width * moe.chain_steps
    return float(sum(per_unit * (moe.d_ff * a + shared) for a in active_experts_L))


def measure(workdir: pathlib.Path, config: Config, final: dict) -> dict:
    """One finished run's numbers: losses, curves, loads, per-token experts and parameters."""
    records = metrics.read_metrics(workdir / metrics.METRICS_FILE)
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if "eval_loss" in r]
    tokens = token_stats.held_out_token_stats(workdir)
    experts_N = tokens.experts_LxN.sum(0)
    run = {
        "eval_loss": final["eval_loss"],
        "train_loss": final["loss"],
        "train_curve": [[r["step"], r["loss"]] for r in train],
        "eval_curve": [[r["step"], r["eval_loss"]] for r in evals],
        "active_curve": [[r["step"], r["active_experts"]] for r in train],
        "load_curve": [[r["step"], _max_over_mean(r["tokens_per_expert"])] for r in train],
        "experts_per_layer": tokens.experts_LxN.mean(1).tolist(),
        "experts_per_token": float(tokens.experts_LxN.mean(0).mean()),
        "experts_per_token_std": float(tokens.experts_LxN.mean(0).std()),
        "expert_count_hist": np.bincount(
            tokens.experts_LxN.astype(int).ravel(), minlength=config.model.moe.slots + 1
        ).tolist(),
        "loss_experts_spearman": repro_readings.spearman(tokens.loss_N, experts_N),
        "loss_by_experts": repro_readings.mean_loss_by_count(tokens.loss_N, experts_N),
        "held_out_tokens": len(tokens.loss_N),
        "expert_flops_per_token": expert_flops(config, tokens.experts_LxN.mean(1)),
        **parameter_counts(config, tokens.experts_LxN.mean(1)),
    }
    return run


def _max_over_mean(tokens_per_expert) -> float:
    """The busiest expert's load over the mean load, averaged over layers (and chain steps)."""
    load_RxE = np.asarray(tokens_per_expert, np.float64)
    load_RxE = load_RxE.reshape(-1, load_RxE.shape[-1])
    ratio_R = load_RxE.max(-1) / np.maximum(load_RxE.mean(-1), 1e-12)
    return float(ratio_R.mean())


def train_variant(
    runs: pathlib.Path, config: Config, init_from: pathlib.Path | None = None
) -> tuple[pathlib.Path, dict]:
    """Trains (or reads back) one run; returns its directory and its numbers."""
    workdir = run_dir(runs, config, None if init_from is None else init_from.name)
    final = report.load_summary(workdir)
    measured = workdir / MEASURED_FILE
    if final is not None and final.get("step") == config.train.steps and measured.exists():
        return workdir, json.loads(measured.read_text())
    if final is None or final.get("step") != config.train.steps:  # not cached: train it
        params = None
        if init_from is not None:
            params = converted_params(load_state(init_from)[1].params, config)
        final = train_and_evaluate(config, workdir, init_params=params)
    numbers = measure(workdir, config, final)
    measured.write_text(json.dumps(numbers))
    return workdir, numbers


def run_experiment(
    spec: dict, mode: Mode, runs: pathlib.Path, out: pathlib.Path, cached_only: bool = False
) -> dict:
    """Trains every variant and seed of `spec`, aggregates, writes JSON / markdown / PNG. With
    `cached_only` nothing is trained: variants without a finished run in `runs` are listed
    under `not_run` and left out of the table."""
    seeds = range(spec.get("seeds", {}).get(mode.name, mode.seeds))
    phases = {"scratch": spec["variants"]}
    finetune = spec.get("finetune")
    steps = None
    if finetune:
        phases["finetune"] = finetune["variants"]
        steps = max(round(finetune["steps"][mode.name] * mode.finetune_scale), 1)
    per_seed = {phase: {name: [] for name in variants} for phase, variants in phases.items()}
    configs, not_run = {}, {phase: [] for phase in phases}
    started = time.perf_counter()
    for seed in seeds:
        for phase, variants in phases.items():
            init_from = None
            if phase == "finetune":
                source = _config(mode, spec, spec["variants"][finetune["from"]], seed)
                init_from = run_dir(runs, source, None)
            for name, overrides in variants.items():
                config = _config(mode, spec, overrides, seed, steps=steps if init_from else None)
                configs[(phase, name)] = config
                if cached_only and not finished(runs, config, init_from):
                    not_run[phase].append(name)
                    continue
                per_seed[phase][name].append(train_variant(runs, config, init_from)[1])
    first = configs[("scratch", next(iter(spec["variants"])))]
    result = {
        "experiment": spec["name"],
        "title": spec["title"],
        "claim": spec["claim"],
        "mode": mode.name,
        "seeds": list(seeds),
        "settings": _settings(first),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "jax": jax.__version__,
        "wall_time_s": time.perf_counter() - started,
        "phases": {
            phase: {
                name: _aggregate(runs_, configs[(phase, name)], phases[phase][name])
                for name, runs_ in variants.items()
                if len(runs_) == len(seeds)
            }
            for phase, variants in per_seed.items()
        },
        "not_run": {phase: sorted(set(names)) for phase, names in not_run.items() if names},
    }
    if finetune:
        result["finetune"] = {"from": finetune["from"], "steps": steps}
    return render(result, spec, out)


def finished(runs: pathlib.Path, config: Config, init_from: pathlib.Path | None) -> bool:
    """Whether the run of `config` (started from `init_from`) is in the cache, finished."""
    workdir = run_dir(runs, config, None if init_from is None else init_from.name)
    final = report.load_summary(workdir)
    return final is not None and final.get("step") == config.train.steps


def render(result: dict, spec: dict, out: pathlib.Path) -> dict:
    """Computes the reading of `result`, writes its JSON, markdown table and plot into `out`
    and prints the table and the reading; returns `result` with its reading."""
    result["reading"] = repro_readings.READINGS[spec["reading"]](result, spec)
    write_results(out / f"{spec['name']}.json", result)
    table = markdown_table(result)
    for phase, names in result.get("not_run", {}).items():
        table += f"\n\nNot run ({phase}, no finished run in the cache): {', '.join(names)}."
    (out / f"{spec['name']}.md").write_text(table + f"\n\n{result['reading']}\n")
    repro_readings.plot(result, spec, out / f"{spec['name']}.png")
    print(f"\n## {spec['title']}\n\n{table}\n\n{result['reading']}\n")
    return result


def _settings(config: Config) -> dict:
    data, train = config.data, config.train
    return {
        "steps": train.steps,
        "tokens": train.steps * data.batch_size * data.seq_len,
        "batch_size": data.batch_size,
        "seq_len": data.seq_len,
        "learning_rate": train.learning_rate,
        "d_model": config.model.d_model,
        "n_layers": config.model.n_layers,
        "vocab_size": config.model.vocab_size,
    }


SCALARS = (
    "eval_loss",
    "train_loss",
    "experts_per_token",
    "experts_per_token_std",
    "expert_flops_per_token",
    "total_params",
    "active_params",
    "loss_experts_spearman",
)


def _aggregate(runs: list[dict], config: Config, overrides) -> dict:
    """Mean, standard deviation (over seeds) and per-seed values of each scalar, plus the
    per-seed curves and distributions."""
    row = {"overrides": overrides, "router": config_to_dict(config)["model"]["moe"]["router"]}
    for key in SCALARS:
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values,
        }
    for key in ("experts_per_layer", "expert_count_hist"):
        row[key] = np.mean([r[key] for r in runs], axis=0).tolist()
    for key in ("train_curve", "eval_curve", "active_curve", "load_curve", "loss_by_experts"):
        row[key] = [r[key] for r in runs]
    row["held_out_tokens"] = runs[0]["held_out_tokens"]
    return row


def markdown_table(result: dict) -> str:
    """The comparison table: one row per variant (and phase), means ± std over the seeds."""
    extra = repro_readings.EXTRA_COLUMNS.get(result["experiment"], ())
    head = [
        "variant",
        "total params",
        "active params",
        "held-out loss",
        "experts / token / layer",
        "expert MFLOPs / token",
        *(title for title, _ in extra),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase, variants in result["phases"].items():
        for name, row in variants.items():
            label = name if phase == "scratch" else f"{name} (fine-tuned)"
            cells = [
                label,
                f"{row['total_params']['mean'] / 1e6:.3f}M",
                f"{row['active_params']['mean'] / 1e6:.3f}M",
                _pm(row["eval_loss"], 4),
                _pm(row["experts_per_token"], 2),
                f"{row['expert_flops_per_token']['mean'] / 1e6:.2f}",
                *(cell(row) for _, cell in extra),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    if len(stat["values"]) < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU settings (the documented run)")
    parser.add_argument("--only", choices=experiment_names(), action="append")
    parser.add_argument("--seeds", type=int, help="seeds for every experiment")
    parser.add_argument(
        "--steps", type=int, help="training steps of every run (fine-tuning scaled alike)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reproduce"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "reproduce"), help="run cache")
    parser.add_argument(
        "--render", action="store_true", help="only redo tables and plots from --out's JSON"
    )
    parser.add_argument(
        "--cached-only", action="store_true", help="train nothing: tabulate the finished runs"
    )
    args = parser.parse_args()
    jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))  # seeds recompile
    mode = QUICK if args.quick else FULL
    if args.steps is not None:
        mode = scaled(mode, args.steps)
    out, runs = pathlib.Path(args.out), pathlib.Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in args.only or experiment_names():
        spec = load_experiment(name)
        if args.render:
            render(json.loads((out / f"{name}.json").read_text()), spec, out)
            continue
        if args.seeds is not None:
            spec["seeds"] = {mode.name: args.seeds}
        run_experiment(spec, mode, runs, out, cached_only=args.cached_only)
    print(f"all done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
