"""Training throughput of the tiny config per router against a dense model of equal active size.

Every variant is the tiny default LM (configs/tiny.yaml) with one routing change; its dense twin
replaces each MoE FFN with a dense SwiGLU FFN whose hidden width equals the expert width
computed per token (`active experts x d_ff + shared width`), so both have the same active
parameters. All variants train on the same real batches (the embedded corpus) in one process;
after compiling and `--warmup` steps (which also lets the compute-budget controllers of the
null / top-p variants settle) they are timed interleaved, `--steps` steps per call, as the
median of `--runs` calls. Prints a table and writes JSON to bench/results/.

    python bench/train_step.py                 # all variants
    python bench/train_step.py --default-run   # also time `python train.py` (wall time, losses)
    python bench/train_step.py --variants top_k null --set model.n_layers=2 --runs 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from results_io import write_results

from jmoe.lm.model import Transformer
from jmoe.train import data, trainer
from jmoe.train.config import Config
from jmoe.train.run import train_and_evaluate
from jmoe.train.run_config import load_config

# Routing changes on top of the tiny config.
VARIANTS = {
    "top_k (k=2)": [],
    "null experts (AdaMoE, 2 of 4 slots)": [
        "model.moe.router=null_experts",
        "model.moe.router.num_null=8",
        "model.moe.router.k=4",
        "model.moe.router.target_active_experts=2.0",
    ],
    "top_p (budget 2)": [
        "model.moe.router=top_p",
        "model.moe.router.max_k=4",
        "model.moe.router.target_active_experts=2.0",
    ],
    "chain_of_experts (C=2, k=1)": ["model.moe.chain_steps=2", "model.moe.router.k=1"],
    "top_1 + shared expert": ["model.moe.router.k=1", "model.moe.num_shared=1"],
}


def dense_twin(config: Config, base: list[str] = ()) -> Config:
    """The same model (`base` overrides included) with dense FFNs of the MoE's active width in
    every layer: the routed experts a token uses (`moe.expected_active_experts`: k x chain steps,
    or the budget target) plus the shared expert."""
    moe = config.model.moe
    active = moe.expected_active_experts
    width = round(active * moe.d_ff) + moe.shared_width * moe.chain_steps
    return load_config(None, [*base, f"model.d_ff={width}", "model.moe_every=0"])


def _stepper(config: Config, batches: list[dict]):
    """A closure running `n` jitted train steps over `batches` (compiled on creation)."""
    model = Transformer(config.model)
    tx = trainer.make_optimizer(config.train)
    state = trainer.init_state(config, model, tx)
    step = jax.jit(trainer.make_train_step(model, tx), donate_argnums=0)
    box = {"state": state, "i": 0, "active": []}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            box["state"], metrics = step(box["state"], batches[box["i"] % len(batches)])
            box["i"] += 1
        jax.block_until_ready(box["state"])
        box["active"].append(
            float(np.mean(metrics["active_experts"])) if config.model.moe_every else 0.0
        )
        return time.perf_counter() - start

    return run, box


def bench(
    runs: int, steps: int, warmup: int, base_overrides: list[str] = (), names: list[str] = ()
) -> list[dict]:
    """Rows of the variants whose names start with one of `names` (all when empty), each on the
    tiny config with `base_overrides` (both the MoE and its dense twin)."""
    base = load_config(None, base_overrides)
    tokenizer, train_docs, _ = trainer.prepare_data(base, tempfile.mkdtemp(), resume=False)
    iterator = data.make_iterator(
        train_docs, tokenizer, seq_len=base.data.seq_len, batch_size=base.data.batch_size, seed=0
    )
    batches = [next(iterator) for _ in range(16)]
    tokens = steps * base.data.batch_size * base.data.seq_len
    variants = {}
    chosen = {n: o for n, o in VARIANTS.items() if not names or n.startswith(tuple(names))}
    for name, overrides in chosen.items():
        moe = load_config(None, [*base_overrides, *overrides])
        variants[name] = _stepper(moe, batches)
        variants[f"{name} :dense"] = _stepper(dense_twin(moe, base_overrides), batches)
    for run, _ in variants.values():
        run(warmup)
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, (run, _) in variants.items():
            times[name].append(run(steps))
    rows = []
    for name in chosen:
        moe_s, dense_s = statistics.median(times[name]), statistics.median(times[f"{name} :dense"])
        rows.append(
            {
                "variant": name,
                "moe_tokens_per_s": tokens / moe_s,
                "dense_tokens_per_s": tokens / dense_s,
                "moe_over_dense_time": moe_s / dense_s,
                "active_experts": statistics.median(variants[name][1]["active"][-runs:]),
            }
        )
    return rows


def default_run() -> dict:
    """Times `train_and_evaluate` of the default config in a fresh directory."""
    start = time.perf_counter()
    final = train_and_evaluate(load_config(), tempfile.mkdtemp())
    return {**final, "wall_time_s": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for all"
    )
    parser.add_argument(
        "--variants", nargs="+", default=[], help="names (or their first words) to run"
    )
    parser.add_argument("--default-run", action="store_true")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    rows = bench(args.runs, args.steps, args.warmup, args.set, args.variants)
    print(
        f"{'variant':40} {'MoE tok/s':>10} {'dense tok/s':>12} {'time MoE/dense':>15} {'active':>7}"
    )
    for r in rows:
        print(
            f"{r['variant']:40} {r['moe_tokens_per_s']:10.0f} {r['dense_tokens_per_s']:12.0f} "
            f"{r['moe_over_dense_time']:14.2f}x {r['active_experts']:7.2f}"
        )
    result = {
        "machine": platform.processor() or platform.machine(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "runs": args.runs,
        "steps_per_run": args.steps,
        "overrides": args.set,
        "rows": rows,
    }
    if args.default_run:
        result["default_run"] = default_run()
        run = result["default_run"]
        print(
            f"default run: {run['wall_time_s']:.0f} s wall, held-out loss {run['eval_loss']:.3f} "
            f"vs unigram {run['unigram_loss']:.3f}"
        )
    write_results(args.out, result)


if __name__ == "__main__":
    main()
