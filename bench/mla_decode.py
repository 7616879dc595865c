"""Multi-head latent attention decode: the absorbed form against expanding keys and values.

One decode step (one new token per row) of one MLA layer's attention core over a cache of M
positions, at DeepSeek-V2-Lite's head shapes (16 heads, 128 + 64 query/key and 128 value widths,
latent rank 512):
- "absorbed" (`jmoe.lm.mla.attend_absorbed`, what `Transformer.decode` runs): scores and the
  weighted sum on the cached latents;
- "expanded" (`jmoe.lm.mla.attend_expanded`): keys and values rebuilt from the latents of every
  cached position at each step.
Also the cache bytes per token and layer against grouped-query attention with full keys and
values (16 kv heads of width 128, as a multi-head model of the same width). The two forms are
timed in alternation (round-robin), medians over `--runs` rounds.

    python bench/mla_decode.py
    python bench/mla_decode.py --batch 8 --lengths 1024 4096 --runs 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from results_io import write_results

from jmoe.lm.mla import attend_absorbed, attend_expanded

H, N, P, W, R = 16, 128, 64, 128, 512


def inputs(batch: int, length: int, dtype):
    """A random decode step: one query per row, a full cache of `length` positions."""
    keys = jax.random.split(jax.random.key(0), 5)
    normal = lambda k, shape: jax.random.normal(k, shape, dtype)  # noqa: E731
    return (
        normal(keys[0], (batch, 1, H, N)),
        normal(keys[1], (batch, 1, H, P)),
        normal(keys[2], (batch, length, R)),
        normal(keys[3], (batch, length, P)),
        normal(keys[4], (R, H, N + W)) * R**-0.5,
        jnp.ones((batch, 1, length), bool),
        (N + P) ** -0.5,
    )


def time_alternating(fns: dict, args, runs: int) -> dict[str, float]:
    """Median seconds of each jitted fn, the variants called in turn in every round."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="bench/results/mla_decode.json")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    fns = {"absorbed": jax.jit(attend_absorbed, static_argnums=6)}
    fns["expanded"] = jax.jit(attend_expanded, static_argnums=6)
    rows = []
    print(f"{'M':>6} {'absorbed ms':>12} {'expanded ms':>12} {'expanded / absorbed':>20}")
    for length in args.lengths:
        step = inputs(args.batch, length, dtype)
        out = {name: np.asarray(fn(*step), np.float32) for name, fn in fns.items()}
        np.testing.assert_allclose(out["absorbed"], out["expanded"], rtol=2e-2, atol=2e-2)
        t = time_alternating(fns, step, args.runs)
        ratio = t["expanded"] / t["absorbed"]
        print(
            f"{length:>6} {t['absorbed'] * 1e3:>12.3f} {t['expanded'] * 1e3:>12.3f} {ratio:>20.2f}"
        )
        rows.append(dict(cache_length=length, seconds=t, expanded_over_absorbed=ratio))
    itemsize = dtype.itemsize
    cache = {"mla": (R + P) * itemsize, "gqa_16x128": 2 * 16 * 128 * itemsize}
    print(f"cache bytes per token and layer: MLA {cache['mla']}, GQA 16x128 {cache['gqa_16x128']}")
    write_results(
        args.out,
        dict(
            device=str(jax.devices()[0]),
            machine=platform.machine(),
            batch=args.batch,
            dtype=args.dtype,
            runs=args.runs,
            shapes=dict(heads=H, nope=N, rope=P, value=W, latent_rank=R),
            decode_step=rows,
            cache_bytes_per_token_layer=cache,
        ),
    )


if __name__ == "__main__":
    main()
