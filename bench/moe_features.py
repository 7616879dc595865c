"""What GPT-OSS's MoE features cost: the MoE layer forward+backward with per-expert biases, the
clamped SwiGLU unit and a router logit bias, against the plain SwiGLU layer.

Variants run interleaved (one call of each in turn, `--runs` rounds after a warm-up), so a
shared machine's load falls on all of them alike; the table gives the median time per call and
its ratio to the plain layer. JSON goes to bench/results/moe_features.json.

    python bench/moe_features.py                               # CPU-sized default shape
    python bench/moe_features.py --tokens 16384 --d 2880 --f 2880 --experts 32 --k 4 --impl pallas
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from results_io import write_results

import jmoe

VARIANTS = {
    "swiglu": dict(),
    "swiglu+expert_bias": dict(expert_bias=True),
    "clamped_swiglu": dict(activation="clamped_swiglu"),
    "gpt_oss (clamped, expert+router bias)": dict(
        activation="clamped_swiglu", expert_bias=True, router_bias=True
    ),
}


def _step(cfg: jmoe.MoEConfig, x_BxSxD: jax.Array):
    model = jmoe.MoE(cfg)
    variables = model.init(jax.random.key(0), x_BxSxD)

    def loss(params, x):
        y, stats = model.apply({**variables, "params": params}, x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + stats["aux_loss"]

    return jax.jit(jax.grad(loss)), (variables["params"], x_BxSxD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--f", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--impl", default="xla", choices=["xla", "ragged_dot", "pallas"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()

    base = jmoe.MoEConfig(
        d_model=args.d, d_ff=args.f, num_experts=args.experts, router=jmoe.TopK(k=args.k),
        implementation=args.impl, dtype=args.dtype,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d), args.dtype)
    steps = {name: _step(dataclasses.replace(base, **kw), x) for name, kw in VARIANTS.items()}
    for fn, fn_args in steps.values():  # warm-up: compile every variant first
        jax.block_until_ready(fn(*fn_args))
    times = {name: [] for name in steps}
    for _ in range(args.runs):
        for name, (fn, fn_args) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"MoE layer fwd+bwd, T={args.tokens} D={args.d} F={args.f} E={args.experts} "
          f"k={args.k} {args.dtype} impl={args.impl} on {jax.default_backend()}, "
          f"median of {args.runs} interleaved runs")  # fmt: skip
    print(f"{'variant':40s} {'ms':>9s} {'vs swiglu':>10s}")
    for name, seconds in medians.items():
        print(f"{name:40s} {1e3 * seconds:9.2f} {seconds / medians['swiglu']:9.2f}x")
    write_results(
        "bench/results/moe_features.json",
        {
            "args": vars(args),
            "backend": jax.default_backend(),
            "machine": platform.platform(),
            "median_seconds": medians,
            "ratio_to_swiglu": {n: s / medians["swiglu"] for n, s in medians.items()},
        },
    )


if __name__ == "__main__":
    main()
