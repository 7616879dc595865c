"""Decode speed with offloaded experts at several device cache sizes against fully resident
experts: tokens/s, cache hit rate, bytes copied per token and device-resident expert bytes.

The model is the tiny default (configs/tiny.yaml: 4 MoE layers x 8 experts, top-2) with random
weights, which route near-uniformly (a trained model's routing is more skewed and more
predictable, so its hit rates would be higher). Every variant decodes the same prompts with all
slots busy; the variants take turns over the rounds so machine noise spreads over all of them,
and the cache counters are those of the timed rounds (after one untimed round per variant).

On a CPU host and device memory are the same RAM: the numbers measure the mechanism (the
host-driven layer loop, the routing copies, the cache writes), not a PCIe transfer.

    python bench/offload.py        # prints a table, writes bench/results/offload.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys

import jax
from results_io import write_results

from jmoe.compress.surgery import expert_param_bytes
from jmoe.serve.engine import Engine
from jmoe.train.run_config import load_config
from jmoe.train.tokenizer import ByteTokenizer
from serve import decode_steps, random_variables


def make_engines(config, variables, slots: int, sizes: list[int]) -> dict[str, Engine]:
    """The resident engine, then one offloaded engine per cache size (prefetch on), and the
    smallest size again without prefetch."""
    kwargs = dict(num_slots=slots, max_queue=1024)
    tokenizer = ByteTokenizer()
    engines = {"resident": Engine(config, variables, tokenizer, **kwargs)}
    for size in sizes:
        engines[f"cache {size}"] = Engine(
            config, variables, tokenizer, offload_experts=True, expert_cache=size, **kwargs
        )
    no_prefetch = Engine(
        config, variables, tokenizer, offload_experts=True, expert_cache=sizes[0], **kwargs
    )
    no_prefetch.steps.prefetch = False
    engines[f"cache {sizes[0]}, no prefetch"] = no_prefetch
    return engines


def profile(engines: dict[str, Engine], batch: int, rounds: int, steps: int) -> dict:
    """Median decode step time, tokens/s and (offloaded) the cache counters of the timed rounds."""
    for engine in engines.values():  # compiles and fills the caches, untimed
        decode_steps(engine, batch, steps)
    before = {
        name: dataclasses.replace(e.steps.expert_cache.stats)
        for name, e in engines.items()
        if hasattr(e.steps, "expert_cache")
    }
    records = {name: {"seconds": [], "rows": []} for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            new = decode_steps(engine, batch, steps)
            records[name]["seconds"] += new["seconds"]
            records[name]["rows"] += new["rows"]
    results = {}
    for name, engine in engines.items():
        r = records[name]
        tokens = sum(r["rows"])
        row = dict(
            step_ms=1e3 * statistics.median(r["seconds"]),
            tokens_per_s=tokens / sum(r["seconds"]),
            device_expert_bytes=engine.device_expert_bytes,
        )
        if name in before:
            now, old = engine.steps.expert_cache.stats, before[name]
            delta = {
                f.name: getattr(now, f.name) - getattr(old, f.name) for f in dataclasses.fields(now)
            }
            needed = delta["hits"] + delta["misses"]
            row.update(
                cache_experts=engine.steps.expert_cache.capacity,
                hit_rate=delta["hits"] / needed if needed else 0.0,
                bytes_moved_per_token=delta["bytes_moved"] / tokens,
                prefetch_hits=delta["prefetch_hits"],
                prefetch_wasted=delta["prefetch_wasted"],
                **{k: delta[k] for k in ("hits", "misses", "evictions", "prefetched")},
            )
        results[name] = row
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--slots", type=int, default=4, help="busy decode slots")
    parser.add_argument("--sizes", default="8,16,24", help="cache sizes in experts")
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--out", default="bench/results/offload.json")
    args = parser.parse_args()
    config = load_config(args.config)
    variables = random_variables(config)
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = make_engines(config, variables, args.slots, sizes)
    results = profile(engines, args.slots, args.rounds, args.steps)
    resident = results["resident"]
    all_bytes = expert_param_bytes(config.model, variables)
    print(
        f"{args.config}: {config.model.n_layers} layers x {config.model.moe.num_experts} "
        f"experts, {args.slots} busy slots, {args.rounds} rounds x {args.steps} steps "
        f"(jax {jax.__version__}, {jax.devices()[0].device_kind}); all experts {all_bytes} B"
    )
    print(
        f"{'variant':<26} {'step ms':>8} {'tok/s':>8} {'vs res.':>8} {'hit rate':>8} "
        f"{'KiB/tok':>8} {'pf used/wasted':>15} {'device expert B':>16}"
    )
    for name, r in results.items():
        hit = f"{r['hit_rate']:.2f}" if "hit_rate" in r else "-"
        moved = f"{r['bytes_moved_per_token'] / 1024:.1f}" if "hit_rate" in r else "-"
        prefetch = f"{r['prefetch_hits']}/{r['prefetch_wasted']}" if "hit_rate" in r else "-"
        print(
            f"{name:<26} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.0f} "
            f"{r['tokens_per_s'] / resident['tokens_per_s']:>8.2f} {hit:>8} {moved:>8} "
            f"{prefetch:>15} {r['device_expert_bytes']:>16}"
        )
    write_results(
        args.out,
        dict(
            config=args.config,
            slots=args.slots,
            rounds=args.rounds,
            steps=args.steps,
            all_expert_bytes=all_bytes,
            platform=platform.platform(),
            python=sys.version.split()[0],
            jax=jax.__version__,
            device=jax.devices()[0].device_kind,
            note="shared machine; CPU host and device memory are the same RAM",
            variants=results,
        ),
    )


if __name__ == "__main__":
    main()
