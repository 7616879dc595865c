"""Compression methods on a trained MoE LM: routed-expert memory against held-out loss.

Trains the default tiny model (configs/tiny.yaml; `--preset small` for configs/small.yaml) with
`train_and_evaluate`, cached in `--runs` by a hash of its config like bench/reproduce.py, then
measures router statistics on the even files of a calibration set (saved with the run under
`router_stats/`) and applies every compression method of `METHODS` to the trained weights. For
each it reports the routed experts' bytes (`surgery.expert_param_bytes`) and two held-out losses
of the trainer's own evaluation (`eval_step` over `train.eval_batches` batches): on the run's
held-out documents, and on the calibration set's odd files (the task's own unseen text). It
prints a table and writes JSON and a memory-vs-loss plot under bench/results/.

    python bench/compress.py --quick                  # CPU: a short run, minutes
    python bench/compress.py --preset small --steps 2000

A method is `(config, variables, context) -> (config, variables)`: a new entry of `METHODS`
(merging, quantization, a combination) is one more line.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pathlib
import platform
import time
from collections.abc import Callable

import jax
import numpy as np
from reproduce import FULL, QUICK, RUN_SETTINGS, finished, run_dir
from results_io import write_results

from jmoe.compress import surgery
from jmoe.compress.calibration import CALIBRATION_SETS, calibration_texts, calibration_tokens
from jmoe.compress.merge import merge_method
from jmoe.compress.prune import prune_experts
from jmoe.compress.quantize import quantize_method
from jmoe.compress.router_stats import RouterStats, router_stats, stats_path
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.serve.runs import load_run
from jmoe.train import data
from jmoe.train.config import Config
from jmoe.train.run import train_and_evaluate
from jmoe.train.run_config import load_config
from jmoe.train.trainer import TrainState, evaluate, make_eval_step

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = {"tiny": REPO / "configs" / "tiny.yaml", "small": REPO / "configs" / "small.yaml"}


@dataclasses.dataclass(frozen=True)
class Context:
    """What a compression method may use besides the weights.

    Attributes:
      stats: router statistics of the trained model on the calibration set.
      tokens_BxS, mask_BxS: the calibration tokens (for methods that trace routings).
      tokenizer: the run's tokenizer.
      run_dir: the trained run's directory.
    """

    stats: RouterStats
    tokens_BxS: np.ndarray
    mask_BxS: np.ndarray
    tokenizer: object
    run_dir: pathlib.Path


CONTROL_SET = "asyncio"  # another task's calibration, for the control rows
Method = Callable[[ModelConfig, dict, Context], tuple[ModelConfig, dict]]


def _then(*methods: Method) -> Method:
    """The methods applied one after another (pruning or merging, then quantization)."""

    def method(config: ModelConfig, variables: dict, context: Context):
        for step in methods:
            config, variables = step(config, variables, context)
        return config, variables

    return method


def _merging(fraction: float, align: bool = True) -> Method:
    """MC-SMoE merging to `round(fraction * E)` experts per layer on the context's calibration
    tokens (`align=False`: without the hidden-unit alignment, the ablation)."""

    def method(config: ModelConfig, variables: dict, context: Context):
        num_groups = max(round(fraction * config.moe.num_experts), 1)
        return merge_method(num_groups, align=align)(config, variables, context)

    return method


def _pruning(score: str, fraction: float, calibration: str | None = None) -> Method:
    """Pruning to `round(fraction * E)` experts per layer by `score`, on the context's
    statistics or, with `calibration`, on another set's (the control: is the task's own
    calibration better for the task than another's?)."""

    def method(config: ModelConfig, variables: dict, context: Context):
        stats = context.stats
        if calibration is not None:
            b, s = context.tokens_BxS.shape
            tokens_BxS, mask_BxS = calibration_tokens(
                calibration, context.tokenizer, seq_len=s, max_sequences=b
            )
            stats = router_stats(config, variables, tokens_BxS, mask_BxS, source=calibration)
        keep = max(round(fraction * config.moe.num_experts), 1)
        return prune_experts(config, variables, stats, keep, score=score)

    return method


METHODS: dict[str, Method] = {
    "none": lambda config, variables, context: (config, variables),
    **{
        f"prune_{score}_{fraction:g}": _pruning(score, fraction)
        for score in ("tcess", "frequency")
        for fraction in (0.75, 0.5, 0.25)
    },
    **{
        f"prune_tcess_{CONTROL_SET}_{fraction:g}": _pruning("tcess", fraction, CONTROL_SET)
        for fraction in (0.5, 0.25)
    },
    **{f"merge_{fraction:g}": _merging(fraction) for fraction in (0.75, 0.5, 0.25)},
    "merge_unaligned_0.5": _merging(0.5, align=False),
    **{f"quantize_{kind}": quantize_method(kind) for kind in ("int8", "fp8")},
    **{
        f"prune_tcess_{fraction:g}+int8": _then(
            _pruning("tcess", fraction), quantize_method("int8")
        )
        for fraction in (0.5, 0.25)
    },
    "merge_0.5+int8": _then(_merging(0.5), quantize_method("int8")),
}


def bench_config(preset: str, quick: bool, steps: int | None) -> Config:
    """The trained model's config: the preset with reproduce.py's run settings (its quick or
    full mode for the tiny preset), and `steps` training steps if given."""
    overrides = [*RUN_SETTINGS]
    if preset == "tiny":
        overrides = [*(QUICK if quick else FULL).overrides, *overrides]
    elif quick:
        overrides += ["data.max_bytes=2000000", "data.batch_size=16", "train.steps=100"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return load_config(PRESETS[preset], overrides)


def held_out_docs(config: Config) -> list[str]:
    """The run's held-out documents (its `data` split)."""
    corpus = data.read_corpus(config.data.source, max_bytes=config.data.max_bytes)
    return data.split_documents(corpus.documents, config.data.eval_fraction, config.data.seed)[1]


def eval_batches(config: Config, tokenizer, docs: list[str]) -> list[dict]:
    """`docs` in the batches the run's evaluation reads (its first `train.eval_batches`)."""
    batches = data.eval_iterator(
        docs, tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size
    )
    return list(itertools.islice(batches, config.train.eval_batches))


def held_out_loss(model: ModelConfig, variables: dict, batches: list[dict]) -> float:
    """Mean held-out cross-entropy (nats per token) with the trainer's `eval_step`."""
    state = TrainState(
        params=variables["params"],
        opt_state=None,
        moe_state=variables.get("moe_state", {}),
        step=np.int32(0),
        rng=None,
        bad_steps=np.int32(0),
    )
    eval_step = jax.jit(make_eval_step(Transformer(model)))
    return evaluate(eval_step, state, batches)["eval_loss"]


def run(args) -> dict:
    config = bench_config(args.preset, args.quick, args.steps)
    runs = pathlib.Path(args.runs)
    workdir = run_dir(runs, config, None)
    if not finished(runs, config, None):
        train_and_evaluate(config, workdir)
    trained = load_run(workdir)
    model, variables, tokenizer = trained.config.model, trained.variables, trained.tokenizer
    # The calibration set's even files calibrate; its odd files are the task's held-out text.
    task_texts = calibration_texts(args.calibration)
    tokens_BxS, mask_BxS = calibration_tokens(
        task_texts[0::2], tokenizer, seq_len=config.data.seq_len, max_sequences=args.sequences
    )
    stats = router_stats(model, variables, tokens_BxS, mask_BxS, source=args.calibration)
    stats.save(stats_path(workdir, args.calibration))
    context = Context(stats, tokens_BxS, mask_BxS, tokenizer, workdir)
    batches = eval_batches(config, tokenizer, held_out_docs(config))
    task_batches = eval_batches(config, tokenizer, task_texts[1::2])
    rows = {}
    for name in args.methods or METHODS:
        started = time.perf_counter()
        new_model, new_variables = METHODS[name](model, variables, context)
        rows[name] = {
            "experts_per_layer": new_model.moe.num_experts,
            "expert_bytes": surgery.expert_param_bytes(new_model, new_variables),
            "eval_loss": held_out_loss(new_model, new_variables, batches),
            "task_loss": held_out_loss(new_model, new_variables, task_batches),
            "seconds": time.perf_counter() - started,
        }
        print(f"{name}: {rows[name]}", flush=True)
    return {
        "preset": args.preset,
        "mode": "quick" if args.quick else "full",
        "run": str(workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir),
        "steps": config.train.steps,
        "calibration": {
            "set": args.calibration,
            "files": f"{len(task_texts[0::2])} even files (the {len(task_texts[1::2])} odd ones "
            "are the task's held-out text)",
            "sequences": int(tokens_BxS.shape[0]),
            "tokens": int(stats.num_tokens),
            "confidence": stats.confidence,
        },
        "held_out_tokens": int(sum(batch["mask"].sum() for batch in batches)),
        "task_held_out_tokens": int(sum(batch["mask"].sum() for batch in task_batches)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "backend": jax.default_backend(),
        "methods": rows,
    }


def markdown_table(result: dict) -> str:
    base = result["methods"].get("none")
    head = ["method", "experts / layer", "expert MB", "memory vs none", "held-out loss", "Δ"]
    head += [f"{result.get('calibration', {}).get('set', 'task')} held-out loss", "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["methods"].items():
        ratio = f"{row['expert_bytes'] / base['expert_bytes']:.2f}" if base else "n/a"
        delta = f"{row['eval_loss'] - base['eval_loss']:+.4f}" if base else "n/a"
        task_delta = f"{row['task_loss'] - base['task_loss']:+.4f}" if base else "n/a"
        cells = [
            name,
            str(row["experts_per_layer"]),
            f"{row['expert_bytes'] / 1e6:.3f}",
            ratio,
            f"{row['eval_loss']:.4f}",
            delta,
            f"{row['task_loss']:.4f}",
            task_delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Held-out loss against routed-expert memory, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = result["calibration"]["set"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    for ax, key, what in [(axes[0], "eval_loss", "corpus"), (axes[1], "task_loss", task)]:
        for name, row in result["methods"].items():
            ax.scatter(row["expert_bytes"] / 1e6, row[key], label=name)
        ax.set(
            xlabel="routed expert weights (MB)",
            ylabel="held-out loss (nats / token)",
            title=f"{what} held-out text ({result['preset']}, calibrated on {task!r})",
        )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--quick", action="store_true", help="a short CPU run")
    parser.add_argument("--steps", type=int, help="training steps of the run")
    parser.add_argument("--calibration", choices=sorted(CALIBRATION_SETS), default="email")
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--methods", choices=sorted(METHODS), action="append")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "compress"), help="run cache")
    args = parser.parse_args()
    jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
    started = time.perf_counter()
    result = run(args)
    result["wall_time_s"] = time.perf_counter() - started
    name = "compress" if args.preset == "tiny" else f"compress_{args.preset}"
    out = pathlib.Path(args.out)
    write_results(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    print(f"\n{markdown_table(result)}\n\nwrote {out / f'{name}.png'}")


if __name__ == "__main__":
    main()
