"""MoE layer vs a dense SwiGLU FFN with the same active FLOPs, forward and forward+backward.

For every (E, k) the MoE layer (one variant per grouped-matmul implementation) and a dense FFN of
hidden width k * F are timed in one process, interleaved, as the median of `--runs` calls after a
warm-up, with a pause between calls so freed memory settles. Backward timings are `grad` of
`sum(y * ct)` with a random cotangent (XLA folds `sum(y)`). Prints a table of times and
MoE / dense ratios and writes JSON.

    python bench/moe_layer.py                       # the full grid (E 8, 64; k 1, 2, 8)
    python bench/moe_layer.py --experts 8 --k 2     # one point
    python bench/moe_layer.py --scenario all_to_one_expert   # catalogue skew: k experts take all

Scenarios come from the shape catalogue (`jmoe.catalogue`): "balanced" routes with the random
router; "all_to_one_expert" and "empty_experts" force the selection with the `moe_state` bias
(every token to experts 0..k-1; only the even experts used).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmoe

RAGGED_DOT_MEMORY_LIMIT = 8 << 30  # bytes of the dense [M, F] per-group intermediates on CPU


def _dense_ffn(params, x_TxD):
    h = jax.nn.silu(x_TxD @ params["w_gate"]) * (x_TxD @ params["w_up"])
    return h @ params["w_down"]


def _dense_params(key, d, f):
    k1, k2, k3 = jax.random.split(key, 3)
    scale = 1 / np.sqrt(d)
    return {
        "w_gate": jax.random.normal(k1, (d, f)) * scale,
        "w_up": jax.random.normal(k2, (d, f)) * scale,
        "w_down": jax.random.normal(k3, (f, d)) / np.sqrt(f),
    }


def _scenario_bias(scenario, e, k):
    """Selection bias that forces the catalogue's routing situation onto the random router."""
    if scenario == "balanced":
        return jnp.zeros((e,))
    if scenario == "all_to_one_expert":
        return jnp.where(jnp.arange(e) < k, 100.0, 0.0)
    if scenario == "empty_experts":
        return jnp.where(jnp.arange(e) % 2 == 1, -100.0, 0.0)
    raise ValueError(f"unknown scenario {scenario!r}")


def _variants(args, e, k):
    """name -> (forward fn, forward+backward fn, args) for one (E, k) point."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.tokens, args.d_model))
    ct = jax.random.normal(jax.random.key(1), x.shape)
    out = {}
    dense = _dense_params(jax.random.key(2), args.d_model, k * args.d_ff)
    loss = lambda p, x: jnp.sum(_dense_ffn(p, x) * ct)  # noqa: E731
    out["dense"] = (jax.jit(loss), jax.jit(jax.grad(loss, (0, 1))), (dense, x))
    for impl in args.impl:
        rows = args.tokens * k
        if impl == "ragged_dot" and 3 * 4 * rows * e * args.d_ff > RAGGED_DOT_MEMORY_LIMIT:
            out[f"moe[{impl}]"] = None
            continue
        cfg = jmoe.MoEConfig(
            d_model=args.d_model, d_ff=args.d_ff, num_experts=e, top_k=k, implementation=impl
        )
        model = jmoe.MoE(cfg)
        variables = model.init(jax.random.key(3), x)
        variables["moe_state"] = {"bias": _scenario_bias(args.scenario, e, k)}

        def loss(p, x, model=model, variables=variables):
            y, stats = model.apply({**variables, "params": p}, x)
            return jnp.sum(y * ct) + stats["aux_loss"]

        out[f"moe[{impl}]"] = (
            jax.jit(loss),
            jax.jit(jax.grad(loss, (0, 1))),
            (variables["params"], x),
        )
    return out


def _time(fn, fn_args, pause):
    time.sleep(pause)
    start = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    return time.perf_counter() - start


def bench_point(args, e, k):
    variants = _variants(args, e, k)
    live = {n: v for n, v in variants.items() if v is not None}
    for fwd, fwd_bwd, fn_args in live.values():  # compile + warm up
        for fn in (fwd, fwd_bwd):
            jax.block_until_ready(fn(*fn_args))
    times = {(n, mode): [] for n in live for mode in ("fwd", "fwd_bwd")}
    for _ in range(args.runs):
        for n, (fwd, fwd_bwd, fn_args) in live.items():
            times[(n, "fwd")].append(_time(fwd, fn_args, args.pause))
            times[(n, "fwd_bwd")].append(_time(fwd_bwd, fn_args, args.pause))
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for n in variants:
        row = {"experts": e, "k": k, "variant": n}
        if n not in live:
            row["skipped"] = "dense per-group fallback would not fit in memory"
        else:
            for mode in ("fwd", "fwd_bwd"):
                row[f"{mode}_ms"] = 1e3 * med[(n, mode)]
                row[f"{mode}_ratio"] = med[(n, mode)] / med[("dense", mode)]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--impl", nargs="+", default=["xla", "ragged_dot"])
    parser.add_argument(
        "--scenario", default="balanced", choices=["balanced", "all_to_one_expert", "empty_experts"]
    )
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between timed calls")
    parser.add_argument("--out", default="bench/results/moe_layer.json")
    args = parser.parse_args()

    rows = []
    print(
        f"T={args.tokens} D={args.d_model} F={args.d_ff} backend={jax.default_backend()} "
        f"jax={jax.__version__}; ratio = time / dense SwiGLU FFN with hidden k*F"
    )
    print(
        f"{'E':>4} {'k':>3} {'variant':<16} {'fwd ms':>9} {'ratio':>6} {'fwd+bwd ms':>11} "
        f"{'ratio':>6}"
    )
    for e in args.experts:
        for k in args.k:
            for row in bench_point(args, e, k):
                rows.append(row)
                if "skipped" in row:
                    print(f"{e:>4} {k:>3} {row['variant']:<16} skipped: {row['skipped']}")
                else:
                    print(
                        f"{e:>4} {k:>3} {row['variant']:<16} {row['fwd_ms']:9.1f} "
                        f"{row['fwd_ratio']:6.2f} {row['fwd_bwd_ms']:11.1f} "
                        f"{row['fwd_bwd_ratio']:6.2f}",
                        flush=True,
                    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "args": vars(args),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
