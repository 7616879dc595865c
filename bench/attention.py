"""Attention forward + backward time: the plain path against `jax.nn.dot_product_attention`.

One `jmoe.lm.attention.Attention` layer (GQA) per variant: full causal, a sliding window, packed
documents (segment ids) and, plain only, attention sinks; each with `attention_impl="plain"` and
`"dot_product"` (cuDNN flash attention on a GPU in bfloat16, XLA elsewhere). After compiling,
the variants are timed interleaved, one call each per round, as the median of `--runs` rounds;
the table gives milliseconds and the dot_product / plain ratio. Writes JSON to bench/results/.

    python bench/attention.py                       # B=4, S=512 on the default backend
    python bench/attention.py --seq 2048 --dtype bfloat16
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

from jmoe.lm.attention import Attention

MASKS = {
    "causal": dict(window=None, documents=False),
    "sliding window 128": dict(window=128, documents=False),
    "4 documents": dict(window=None, documents=True),
}


def make_step(impl: str, window, sinks: bool, dtype):
    """A jitted `(params, x, positions, segment_ids) -> grads` of one attention layer."""
    module = Attention(
        8, 2, 64, dtype=dtype, sliding_window=window, attention_sinks=sinks, attention_impl=impl
    )

    def loss(params, x, positions, segment_ids):
        out, _ = module.apply({"params": params}, x, positions, None, segment_ids)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    return module, jax.jit(jax.grad(loss))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    b, s, d = args.batch, args.seq, 512
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, s, d)), dtype)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    documents = jnp.broadcast_to(jnp.arange(s) * 4 // s, (b, s))

    variants = {}
    for mask, spec in MASKS.items():
        segment_ids = documents if spec["documents"] else None
        for impl in ("plain", "dot_product"):
            variants[(mask, impl)] = (spec["window"], False, segment_ids, impl)
    variants[("causal + sinks", "plain")] = (None, True, None, "plain")
    calls = {}
    for key, (window, sinks, segment_ids, impl) in variants.items():
        module, step = make_step(impl, window, sinks, dtype)
        params = module.init(jax.random.key(0), x, positions)["params"]
        args_ = (params, x, positions, segment_ids)
        jax.block_until_ready(step(*args_))  # compile
        calls[key] = (step, args_)
    times = {key: [] for key in calls}
    for _ in range(args.runs):
        for key, (step, args_) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args_))
            times[key].append(time.perf_counter() - start)
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; B={b} S={s} H=8 G=2 A=64 "
        f"{args.dtype}; forward + backward, median of {args.runs} interleaved rounds"
    )
    print(f"{'mask':<22}{'plain ms':>10}{'dot_product ms':>16}{'ratio':>8}")
    rows = []
    for mask in (*MASKS, "causal + sinks"):
        plain, dot = ms[(mask, "plain")], ms.get((mask, "dot_product"))
        ratio = None if dot is None else dot / plain
        dot_text = "-" if dot is None else f"{dot:.2f}"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        print(f"{mask:<22}{plain:>10.2f}{dot_text:>16}{ratio_text:>8}")
        rows.append({"mask": mask, "plain_ms": plain, "dot_product_ms": dot, "ratio": ratio})
    write_results(
        f"bench/results/attention_{jax.default_backend()}_{args.dtype}_s{s}.json",
        {
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "machine": platform.machine(),
            "shape": {"batch": b, "seq": s, "heads": 8, "kv_heads": 2, "head_dim": 64},
            "dtype": args.dtype,
            "runs": args.runs,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
