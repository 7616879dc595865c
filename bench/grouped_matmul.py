"""The grouped matmul against `jax.lax.ragged_dot`, a one-hot einsum dispatch and a dense matmul.

`M` rows sorted by group, `E` groups of equal size, `[M, K] x [E, K, N]`; forward and
forward+backward (grad in `x` and `w` of `sum(y * ct)`), each variant timed interleaved with the
others as the median of `--runs` calls after a warm-up:
- "xla": `jmoe.grouped_matmul(implementation="xla")`, the tiled loop over valid row tiles;
- "ragged_dot": `jax.lax.ragged_dot` called directly;
- "one_hot_einsum": the GShard-style dispatch, a one-hot `[M, E, C]` mask (C = rows per group)
  gathering the rows into `[E, C, K]` by einsum, a batched matmul, and the combine einsum back;
- "dense": one `[M, K] x [K, N]` matmul, the same FLOPs with no grouping (ratio 1).

    python bench/grouped_matmul.py                        # M 8192, K 512, N 1024, E 8 and 64
    python bench/grouped_matmul.py --rows 256 --k 64 --n 128 --experts 4 --runs 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from results_io import write_results

import jmoe


def one_hot_einsum(x_MxK, w_ExKxN, group_sizes_E):
    """`y[r] = x[r] @ w[group(r)]` through a one-hot dispatch mask, as einsum MoE layers do."""
    m, e = x_MxK.shape[0], w_ExKxN.shape[0]
    capacity = m // e  # equal groups: every row has a slot
    group_M = jnp.repeat(jnp.arange(e), group_sizes_E, total_repeat_length=m)
    # 1. a row's slot within its group: its index minus the group's first row
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    slot_M = jnp.arange(m) - starts_E[group_M]
    mask_MxExC = (
        jax.nn.one_hot(group_M, e, dtype=x_MxK.dtype)[:, :, None]
        * jax.nn.one_hot(slot_M, capacity, dtype=x_MxK.dtype)[:, None, :]
    )
    x_ExCxK = jnp.einsum("mec,mk->eck", mask_MxExC, x_MxK)
    y_ExCxN = jnp.einsum("eck,ekn->ecn", x_ExCxK, w_ExKxN)
    return jnp.einsum("mec,ecn->mn", mask_MxExC, y_ExCxN)


def variants(rows: int, k: int, n: int, e: int) -> dict:
    """`name -> (fwd, fwd_bwd, args)` for one shape."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (rows, k), jnp.float32)
    w = jax.random.normal(keys[1], (e, k, n), jnp.float32) / k**0.5
    ct = jax.random.normal(keys[2], (rows, n), jnp.float32)
    sizes = jnp.full((e,), rows // e, jnp.int32)
    fns = {
        "xla": lambda x, w: jmoe.grouped_matmul(x, w, sizes, implementation="xla"),
        "ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
        "one_hot_einsum": lambda x, w: one_hot_einsum(x, w, sizes),
        "dense": lambda x, w: x @ w[0],
    }
    out = {}
    for name, fn in fns.items():
        loss = lambda x, w, fn=fn: jnp.sum(fn(x, w) * ct)  # noqa: E731
        out[name] = (jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1))), (x, w))
    return out


def time_interleaved(fns: dict, runs: int) -> dict[str, dict[str, float]]:
    """Median seconds of every variant's fwd and fwd_bwd, calls interleaved across variants."""
    times = {(name, part): [] for name in fns for part in ("fwd", "fwd_bwd")}
    for fwd, fwd_bwd, args in fns.values():
        jax.block_until_ready((fwd(*args), fwd_bwd(*args)))  # compile
    for _ in range(runs):
        for name, (fwd, fwd_bwd, args) in fns.items():
            for part, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name, part].append(time.perf_counter() - start)
    return {
        name: {part: statistics.median(times[name, part]) for part in ("fwd", "fwd_bwd")}
        for name in fns
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", default="bench/results/grouped_matmul.json")
    args = parser.parse_args()
    print(f"M={args.rows} K={args.k} N={args.n}; ratio = time / dense matmul of the same FLOPs")
    print(f"{'E':>4} {'variant':<15} {'fwd ms':>9} {'ratio':>7} {'fwd+bwd ms':>11} {'ratio':>7}")
    rows = []
    for e in args.experts:
        timed = time_interleaved(variants(args.rows, args.k, args.n, e), args.runs)
        for name, t in timed.items():
            row = {
                "experts": e,
                "variant": name,
                "fwd_ms": 1e3 * t["fwd"],
                "fwd_bwd_ms": 1e3 * t["fwd_bwd"],
                "fwd_ratio": t["fwd"] / timed["dense"]["fwd"],
                "fwd_bwd_ratio": t["fwd_bwd"] / timed["dense"]["fwd_bwd"],
            }
            rows.append(row)
            print(
                f"{e:4d} {name:<15} {row['fwd_ms']:9.2f} {row['fwd_ratio']:6.2f}x "
                f"{row['fwd_bwd_ms']:11.2f} {row['fwd_bwd_ratio']:6.2f}x"
            )
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "args": vars(args),
    }
    write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
