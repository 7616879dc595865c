"""MoE layer timings on one machine, forward and forward+backward, as ratios measured in one run.

Two tables:
- dense (default): the MoE layer, one variant per grouped-matmul implementation, against a dense
  SwiGLU FFN of hidden width k * F (the same active FLOPs), for every (E, k).
- adaptive (`--adaptive`): at matched E and K slots, top-k with all K slots against the adaptive
  routers held at K/2 active experts per token by the compute-budget controller (null experts,
  top-p) and against top-k with K/2 slots; reports active experts per token, the expert-FLOP
  saving and the time saving relative to top-k with K slots.

Every variant is timed interleaved with the others, as the median of `--runs` calls after a
warm-up, with a pause between calls so freed memory settles. Backward timings are `grad` of
`sum(y * ct)` with a random cotangent (XLA folds `sum(y)`). Prints a table and writes JSON.

    python bench/moe_layer.py                       # the dense grid (E 8, 64; k 1, 2, 8)
    python bench/moe_layer.py --experts 8 --k 2     # one point
    python bench/moe_layer.py --scenario all_to_one_expert   # catalogue skew: k experts take all
    python bench/moe_layer.py --adaptive --experts 64 --k 4

Scenarios come from the shape catalogue (`tests/shape_cases.py`): "balanced" routes with the random
router; "all_to_one_expert" and "empty_experts" force the selection with the `moe_state` bias
(every token to experts 0..k-1; only the even experts used).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from results_io import write_results

import jmoe
from jmoe.kernels import IMPLEMENTATIONS, pallas
from jmoe.moe.layer import update_state

# jax.lax.ragged_dot computes every group densely on CPU (E times the work, E times the memory):
# run it only where that finishes in reasonable time.
RAGGED_DOT_MAX_ROW_GROUPS = 8192 * 2 * 8  # rows (T * k) x groups (E)
SCENARIOS = ("balanced", "all_to_one_expert", "empty_experts")


@dataclasses.dataclass
class Variant:
    """A function pair to time: `fwd(*args)` and `fwd_bwd(*args)`, plus what it reports."""

    fwd: object
    fwd_bwd: object
    args: tuple
    info: dict = dataclasses.field(default_factory=dict)


def _dense_variant(d, f, x, ct) -> Variant:
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    params = {
        "w_gate": jax.random.normal(k1, (d, f)) / np.sqrt(d),
        "w_up": jax.random.normal(k2, (d, f)) / np.sqrt(d),
        "w_down": jax.random.normal(k3, (f, d)) / np.sqrt(f),
    }

    def loss(p, x):
        h = jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])
        return jnp.sum((h @ p["w_down"]) * ct)

    return Variant(jax.jit(loss), jax.jit(jax.grad(loss, (0, 1))), (params, x))


def _moe_variant(cfg, variables, x, ct) -> Variant:
    model = jmoe.MoE(cfg)

    def loss(p, x):
        y, stats = model.apply({**variables, "params": p}, x)
        return jnp.sum(y * ct) + stats["aux_loss"]

    _, stats = jax.jit(model.apply)(variables, x)
    info = {"active_experts": float(stats["active_experts"])}
    return Variant(jax.jit(loss), jax.jit(jax.grad(loss, (0, 1))), (variables["params"], x), info)


def _scenario_bias(scenario, e, k):
    """Selection bias that forces the catalogue's routing situation onto the random router."""
    if scenario == "all_to_one_expert":
        return jnp.where(jnp.arange(e) < k, 100.0, 0.0)
    if scenario == "empty_experts":
        return jnp.where(jnp.arange(e) % 2 == 1, -100.0, 0.0)
    return jnp.zeros((e,))


def _time_interleaved(variants: dict[str, Variant], runs: int, pause: float) -> dict:
    """Median seconds per (variant, "fwd" | "fwd_bwd"), the variants interleaved."""
    for v in variants.values():  # compile + warm up
        for fn in (v.fwd, v.fwd_bwd):
            jax.block_until_ready(fn(*v.args))
    times = {(n, mode): [] for n in variants for mode in ("fwd", "fwd_bwd")}
    for _ in range(runs):
        for n, v in variants.items():
            for mode, fn in (("fwd", v.fwd), ("fwd_bwd", v.fwd_bwd)):
                time.sleep(pause)
                start = time.perf_counter()
                jax.block_until_ready(fn(*v.args))
                times[(n, mode)].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def _inputs(args):
    x = jax.random.normal(jax.random.key(0), (args.tokens, args.d_model))
    return x, jax.random.normal(jax.random.key(1), x.shape)


def dense_point(args, e, k) -> list[dict]:
    """MoE (each implementation) vs the dense FFN of equal active FLOPs at one (E, k)."""
    x, ct = _inputs(args)
    variants = {"dense": _dense_variant(args.d_model, k * args.d_ff, x, ct)}
    skipped = []
    for impl in args.impl:
        if impl == "ragged_dot" and args.tokens * k * e > RAGGED_DOT_MAX_ROW_GROUPS:
            skipped.append(f"moe[{impl}]")
            continue
        cfg = jmoe.MoEConfig(
            d_model=args.d_model,
            d_ff=args.d_ff,
            num_experts=e,
            implementation=impl,
            router=jmoe.TopK(k=k),
        )
        variables = jmoe.MoE(cfg).init(jax.random.key(3), x)
        variables["moe_state"] = {"bias": _scenario_bias(args.scenario, e, k)}
        variants[f"moe[{impl}]"] = _moe_variant(cfg, variables, x, ct)
    med = _time_interleaved(variants, args.runs, args.pause)
    rows = [
        {
            "experts": e,
            "k": k,
            "variant": n,
            "skipped": "computes every group densely: too slow / too large here",
        }
        for n in skipped
    ]
    for n in variants:
        row = {"experts": e, "k": k, "variant": n}
        for mode in ("fwd", "fwd_bwd"):
            row[f"{mode}_ms"] = 1e3 * med[(n, mode)]
            row[f"{mode}_ratio"] = med[(n, mode)] / med[("dense", mode)]
        rows.append(row)
    return rows


def _controlled(cfg, x, steps):
    """Variables whose compute-budget controller has settled at the router's target."""
    model = jmoe.MoE(cfg)
    variables = model.init(jax.random.key(3), x)
    apply = jax.jit(model.apply)
    state = variables["moe_state"]
    for _ in range(steps):
        _, stats = apply({**variables, "moe_state": state}, x)
        state = update_state(cfg, state, stats)
    return {**variables, "moe_state": state}


def adaptive_point(args, e, k) -> list[dict]:
    """Top-k with k slots vs null / top-p routers held at k/2 active experts, and top-(k/2)."""
    x, ct = _inputs(args)
    base = jmoe.MoEConfig(
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_experts=e,
        implementation="xla",
        router=jmoe.TopK(k=k),
    )
    half = k / 2
    configs = {
        f"top_k k={k}": (base, 0),
        f"null M={e} k={k}": (
            dataclasses.replace(
                base,
                router=jmoe.NullExperts(
                    num_null=e, k=k, target_active_experts=half, budget_rate=0.3
                ),
            ),
            args.controller_steps,
        ),
        f"top_p max_k={k}": (
            dataclasses.replace(
                base, router=jmoe.TopP(max_k=k, target_active_experts=half, budget_rate=0.03)
            ),
            args.controller_steps,
        ),
        f"top_k k={k // 2}": (dataclasses.replace(base, router=jmoe.TopK(k=k // 2)), 0),
    }
    variants = {
        name: _moe_variant(cfg, _controlled(cfg, x, steps), x, ct)
        for name, (cfg, steps) in configs.items()
    }
    med = _time_interleaved(variants, args.runs, args.pause)
    ref = f"top_k k={k}"
    rows = []
    for n, v in variants.items():
        flop_saving = 1 - v.info["active_experts"] / k
        row = {"experts": e, "k": k, "variant": n, **v.info, "flop_saving": flop_saving}
        for mode in ("fwd", "fwd_bwd"):
            row[f"{mode}_ms"] = 1e3 * med[(n, mode)]
            row[f"{mode}_saving"] = 1 - med[(n, mode)] / med[(ref, mode)]
        row["time_per_flop_saving"] = row["fwd_bwd_saving"] / flop_saving if flop_saving else None
        rows.append(row)
    return rows


def _print_dense(row):
    head = f"{row['experts']:>4} {row['k']:>3} {row['variant']:<16}"
    if "skipped" in row:
        print(f"{head} skipped: {row['skipped']}")
    else:
        print(
            f"{head} {row['fwd_ms']:9.1f} {row['fwd_ratio']:6.2f} {row['fwd_bwd_ms']:11.1f} "
            f"{row['fwd_bwd_ratio']:6.2f}",
            flush=True,
        )


def _print_adaptive(row):
    ratio = row["time_per_flop_saving"]
    print(
        f"{row['experts']:>4} {row['k']:>3} {row['variant']:<18} {row['active_experts']:7.2f} "
        f"{row['flop_saving']:7.1%} {row['fwd_ms']:9.1f} {row['fwd_bwd_ms']:11.1f} "
        f"{row['fwd_bwd_saving']:8.1%} {'' if ratio is None else f'{ratio:7.2f}'}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="slots per token (default: 1 2 8; --adaptive: 4)",
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=list(IMPLEMENTATIONS),
        # "pallas" off TPU / GPU runs in the Pallas interpreter: a test mode, not a timing
        default=[n for n in IMPLEMENTATIONS if n != "pallas" or not pallas.interpret()],
        help="grouped-matmul implementations (default: those that run compiled here)",
    )
    parser.add_argument("--scenario", default="balanced", choices=SCENARIOS)
    parser.add_argument("--adaptive", action="store_true", help="the adaptive-router table")
    parser.add_argument("--controller-steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between timed calls")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    args.k = args.k or ([4] if args.adaptive else [1, 2, 8])
    name = "moe_layer_adaptive" if args.adaptive else f"moe_layer_{args.scenario}"

    print(
        f"T={args.tokens} D={args.d_model} F={args.d_ff} scenario={args.scenario} "
        f"backend={jax.default_backend()} jax={jax.__version__}"
    )
    if args.adaptive:
        point, show = adaptive_point, _print_adaptive
        print("savings relative to top_k with K slots; ratio = fwd+bwd time saving / FLOP saving")
        print(
            f"{'E':>4} {'K':>3} {'variant':<18} {'active':>7} {'FLOPs-':>7} {'fwd ms':>9} "
            f"{'fwd+bwd ms':>11} {'time-':>8} {'ratio':>7}"
        )
    else:
        point, show = dense_point, _print_dense
        print("ratio = time / dense SwiGLU FFN with hidden k*F (same active FLOPs)")
        print(
            f"{'E':>4} {'k':>3} {'variant':<16} {'fwd ms':>9} {'ratio':>6} {'fwd+bwd ms':>11} "
            f"{'ratio':>6}"
        )
    rows = []
    for e in args.experts:
        for k in args.k:
            for row in point(args, e, k):
                show(row)
                rows.append(row)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "args": vars(args),
    }
    write_results(args.out or f"bench/results/{name}.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
