"""Pallas kernel throughput: grouped matmul (forward, activation grad, weight grad), the fused
SwiGLU kernel and the fused gating kernel, against a dense `jnp.dot` of the same FLOPs and
`jax.lax.ragged_dot` (gating: against its XLA path); then the MoE layer forward+backward with
implementation "pallas" vs "xla" vs "ragged_dot".

Shapes (tokens T, width D, expert width F, experts E, slots k; bfloat16; rows M = T * k routed
evenly):
- mixtral: T 16384, D 4096, F 14336, E 8, k 2
- deepseek: T 16384, D 2048, F 1408, E 64, k 6

`--scale s` divides T, D and F by `s` (widths rounded up to a multiple of 128) so a shape fits
memory or, on CPU where the kernels run in the Pallas interpreter, finishes as a smoke check:

    python bench/kernels.py                          # both shapes, full size (GPU / TPU)
    python bench/kernels.py --shape deepseek --scale 2
    python bench/kernels.py --scale 64 --runs 2      # CPU smoke check (interpreted kernels)

Each timing is the median of `--runs` calls after a warm-up. Prints a table (TFLOP/s and the
ratio to the dense matmul) and writes JSON to bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
from results_io import median_seconds, write_results

import jmoe
import pallas_kernels as pk
from jmoe import kernels
from jmoe.kernels import pallas
from jmoe.moe import gating
from pallas_kernels.grouped_matmul import swiglu_bwd, tgmm

SHAPES = {
    "mixtral": dict(tokens=16384, d=4096, f=14336, e=8, k=2),
    "deepseek": dict(tokens=16384, d=2048, f=1408, e=64, k=6),
}
# jax.lax.ragged_dot computes every group densely on CPU: skip it past this many rows x groups.
RAGGED_DOT_MAX_ROW_GROUPS_CPU = 8192 * 2 * 8


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d: int
    f: int
    e: int
    k: int

    @property
    def rows(self) -> int:
        return self.tokens * self.k


def _scaled(name: str, scale: float) -> Shape:
    s = SHAPES[name]
    width = lambda v: max(128, -(-int(v / scale) // 128) * 128)  # noqa: E731
    return Shape(
        name, max(8, int(s["tokens"] / scale)), width(s["d"]), width(s["f"]), s["e"], s["k"]
    )


def _kernel_variants(s: Shape, interpret: bool, with_ragged: bool):
    """{op: (flops, {variant: (fn, args)})} for the four kernel-level operations."""
    m, d, f, e = s.rows, s.d, s.f, s.e
    keys = jax.random.split(jax.random.key(0), 5)
    bf = jnp.bfloat16
    x = jax.random.normal(keys[0], (m, d), bf)
    w = (jax.random.normal(keys[1], (e, d, f)) / np.sqrt(d)).astype(bf)
    w_up = (jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)).astype(bf)
    dy = jax.random.normal(keys[3], (m, f), bf)
    sizes = np.full(e, m // e)
    sizes[: m % e] += 1
    gs = jnp.asarray(sizes, jnp.int32)
    w_dense = w[0]
    kw = dict(interpret=interpret)

    def ragged(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32).astype(bf)

    def ragged_weight_grad(x, dy):
        return jax.vjp(lambda w: ragged(x, w), w)[1](dy)[0]

    def dense(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(bf)

    jit = jax.jit

    def registered(name):  # the grouped matmul of one registry implementation
        return jit(functools.partial(kernels.grouped_matmul, group_sizes_G=gs, implementation=name))

    ops = {
        "gmm fwd": (2 * m * d * f, {
            **{name: (registered(name), (x, w)) for name in kernels.IMPLEMENTATIONS},
            "dense": (jit(dense), (x, w_dense)),
        }),
        "gmm act-grad": (2 * m * d * f, {
            "pallas": (jit(functools.partial(pk.gmm, group_sizes=gs, transpose_rhs=True, **kw)),
                       (dy, w)),
            "ragged_dot": (jit(lambda dy, w: ragged(dy, jnp.swapaxes(w, 1, 2))), (dy, w)),
            "dense": (jit(dense), (dy, w_dense.T)),
        }),
        "gmm weight-grad": (2 * m * d * f, {
            "pallas": (jit(functools.partial(tgmm, group_sizes=gs, **kw)), (x, dy)),
            "ragged_dot": (jit(ragged_weight_grad), (x, dy)),
            "dense": (jit(lambda x, dy: dense(x.T, dy)), (x, dy)),
        }),
        "swiglu fwd": (4 * m * d * f, {
            "pallas": (jit(functools.partial(pk.swiglu, group_sizes=gs, **kw)), (x, w, w_up)),
            "ragged_dot": (jit(lambda x, a, b: jax.nn.silu(ragged(x, a)) * ragged(x, b)),
                           (x, w, w_up)),
            "dense": (jit(lambda x, a, b: jax.nn.silu(dense(x, a)) * dense(x, b)),
                      (x, w_dense, w_up[0])),
        }),
        "swiglu bwd kernel": (4 * m * d * f, {
            "pallas": (jit(functools.partial(swiglu_bwd, group_sizes=gs, **kw)),
                       (x, w, w_up, dy)),
            "dense": (jit(lambda x, a, b: (dense(x, a), dense(x, b))), (x, w_dense, w_up[0])),
        }),
        "gating fwd+bwd": (3 * 2 * s.tokens * d * e, _gating_variants(s)),
    }  # fmt: skip
    if not with_ragged:
        for _, variants in ops.values():
            variants.pop("ragged_dot", None)
    return ops


def _gating_variants(s: Shape):
    """Router matmul + top-k forward and backward: the fused kernel, the XLA path, and the dense
    router matmul alone (its three matmuls are the FLOPs counted)."""
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (s.tokens, s.d), jnp.bfloat16)
    w = jax.random.normal(keys[1], (s.d, s.e)) / np.sqrt(s.d)
    ct_w = jax.random.normal(keys[2], (s.tokens, s.k))
    ct_l = jax.random.normal(keys[3], (s.tokens, s.e))

    def routed(impl):
        def loss(x, w):
            r, _ = gating.top_k_gating(x, w, s.k, implementation=impl)
            return jnp.sum(r.weights * ct_w) + jnp.sum(r.logits * ct_l)

        return jax.jit(jax.grad(loss, (0, 1)))

    def dense_loss(x, w):
        logits = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(logits * ct_l)

    with_gating = [n for n, impl in kernels.IMPLEMENTATIONS.items() if "gating" in impl.ops]
    return {
        **{name: (routed(name), (x, w)) for name in with_gating},
        "dense": (jax.jit(jax.grad(dense_loss, (0, 1))), (x, w)),
    }


def kernel_rows(s: Shape, runs: int, interpret: bool, with_ragged: bool) -> list[dict]:
    rows = []
    for op, (flops, variants) in _kernel_variants(s, interpret, with_ragged).items():
        seconds = {v: median_seconds(fn, args, runs) for v, (fn, args) in variants.items()}
        for v, t in seconds.items():
            row = dict(shape=s.name, op=op, variant=v, ms=1e3 * t, tflops=flops / t / 1e12,
                       vs_dense=seconds["dense"] / t)  # fmt: skip
            print(f"{s.name:<9} {op:<18} {v:<11} {row['ms']:>10.3f} {row['tflops']:>9.2f} "
                  f"{row['vs_dense']:>9.2f}")  # fmt: skip
            rows.append(row)
    return rows


def layer_rows(s: Shape, runs: int, impls: list[str]) -> list[dict]:
    """MoE layer forward+backward per implementation (bfloat16 activations)."""
    x = jax.random.normal(jax.random.key(0), (1, s.tokens, s.d), jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(1), x.shape, jnp.bfloat16)
    cfg0 = jmoe.MoEConfig(
        d_model=s.d, d_ff=s.f, num_experts=s.e, dtype="bfloat16", router=jmoe.TopK(k=s.k)
    )
    variables = jax.jit(jmoe.MoE(cfg0).init)(jax.random.key(2), x)
    flops = 3 * 3 * 2 * s.rows * s.d * s.f  # forward 3 matmuls, backward twice that
    rows = []
    for impl in impls:
        model = jmoe.MoE(dataclasses.replace(cfg0, implementation=impl))

        def loss(p, x, model=model):
            y, stats = model.apply({**variables, "params": p}, x)
            return jnp.sum(y.astype(jnp.float32) * ct) + stats["aux_loss"]

        t = median_seconds(jax.jit(jax.grad(loss, (0, 1))), (variables["params"], x), runs)
        row = dict(shape=s.name, op="moe layer fwd+bwd", variant=impl, ms=1e3 * t,
                   tflops=flops / t / 1e12)  # fmt: skip
        print(
            f"{s.name:<9} {'moe fwd+bwd':<18} {impl:<11} {row['ms']:>10.3f} {row['tflops']:>9.2f}"
        )
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--scale", type=float, default=1.0, help="divide T, D and F by this")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--layer-impl",
        nargs="+",
        choices=list(kernels.IMPLEMENTATIONS),
        default=list(kernels.IMPLEMENTATIONS),
    )
    parser.add_argument("--no-ragged-dot", action="store_true", help="skip jax.lax.ragged_dot")
    parser.add_argument("--out", default="bench/results/kernels.json")
    args = parser.parse_args()
    backend = jax.default_backend()
    interpret = pallas.interpret()
    print(f"backend={backend} jax={jax.__version__} interpret={interpret} scale={args.scale}")
    print(f"{'shape':<9} {'op':<18} {'variant':<11} {'ms':>10} {'TFLOP/s':>9} {'x dense':>9}")
    rows, shapes = [], []
    for name in args.shape:
        s = _scaled(name, args.scale)
        shapes.append(dataclasses.asdict(s))
        print(f"# {s}")
        with_ragged = not args.no_ragged_dot and (
            not interpret or s.rows * s.e <= RAGGED_DOT_MAX_ROW_GROUPS_CPU
        )
        rows += kernel_rows(s, args.runs, interpret, with_ragged)
        impls = [i for i in args.layer_impl if with_ragged or i != "ragged_dot"]
        rows += layer_rows(s, args.runs, impls)
    meta = dict(
        jax=jax.__version__, backend=backend, device=str(jax.devices()[0]),
        machine=platform.machine(), interpret=interpret, shapes=shapes, args=vars(args),
    )  # fmt: skip
    write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
