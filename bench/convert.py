"""`jmoe.convert.from_hf` import time and peak host memory on a synthetic sharded checkpoint.

Writes a random Mixtral-shaped bfloat16 checkpoint of about `--gb` GB (one safetensors shard per
layer, listed by `model.safetensors.index.json`) into a temporary directory, then imports it in
fresh processes, the variants interleaved: onto the default device, and onto a mesh of 8 host
CPU devices over "fsdp" (every large parameter split 8 ways). Each child reports its load time
and its peak resident memory (`ru_maxrss`) above the resident memory it had before loading; the
table compares that with the size on disk. On CPU the loaded parameters are themselves host
memory, so the floor is 1x the checkpoint (the small replicated ones count 8 times on the
mesh).

    python bench/convert.py                 # about 2 GB, 3 runs per variant
    python bench/convert.py --gb 0.5 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

D, H, G, F, E, V = 1024, 16, 4, 3584, 8, 32000  # Mixtral's shape at a quarter of the width
VARIANTS = ("default device", "mesh fsdp=8")


def write_checkpoint(path: str, gb: float) -> int:
    """A random checkpoint of about `gb` GB in `path`; returns its layer count."""
    from ml_dtypes import bfloat16
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a = D // H
    per_layer = 2 * (D * a * (2 * H + 2 * G) + 3 * E * D * F + E * D + 2 * D)
    n_layers = max(1, round((gb * 1e9 - 4 * V * D) / per_layer))

    def rand(*shape):
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(bfloat16)

    shards = [{"model.embed_tokens.weight": rand(V, D), "lm_head.weight": rand(V, D)}]
    shards[0]["model.norm.weight"] = rand(D)
    weight_map = {}
    for i in range(n_layers + 1):
        if i:
            p = f"model.layers.{i - 1}"
            tensors = {
                f"{p}.input_layernorm.weight": rand(D),
                f"{p}.post_attention_layernorm.weight": rand(D),
                f"{p}.self_attn.q_proj.weight": rand(H * a, D),
                f"{p}.self_attn.k_proj.weight": rand(G * a, D),
                f"{p}.self_attn.v_proj.weight": rand(G * a, D),
                f"{p}.self_attn.o_proj.weight": rand(D, H * a),
                f"{p}.mlp.gate.weight": rand(E, D),
                f"{p}.mlp.experts.gate_up_proj": rand(E, 2 * F, D),
                f"{p}.mlp.experts.down_proj": rand(E, D, F),
            }
        else:
            tensors = shards[0]
        name = f"model-{i:05d}-of-{n_layers:05d}.safetensors"
        save_file(tensors, os.path.join(path, name))
        weight_map.update(dict.fromkeys(tensors, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = dict(
        model_type="mixtral",
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=n_layers,
        num_attention_heads=H,
        num_key_value_heads=G,
        num_local_experts=E,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        dtype="bfloat16",
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return n_layers


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, variant: str) -> None:
    """One import in this process; prints a JSON line of its measurements."""
    if variant != VARIANTS[0]:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax

    from jmoe import sharding
    from jmoe.convert import from_hf

    mesh = None
    if variant != VARIANTS[0]:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8))
    jax.block_until_ready(jax.numpy.zeros(1))
    before = rss_bytes()
    start = time.perf_counter()
    _, variables = from_hf(path, mesh=mesh)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(), "before": before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size to generate")
    parser.add_argument("--runs", type=int, default=3, help="imports per variant")
    parser.add_argument("--out", default="bench/results/convert.json")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_io import write_results

    with tempfile.TemporaryDirectory() as path:
        n_layers = write_checkpoint(path, args.gb)
        disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        samples = {v: [] for v in VARIANTS}
        for _ in range(args.runs):
            for variant in VARIANTS:  # interleaved, each in a fresh process
                cmd = [sys.executable, os.path.abspath(__file__), "--child", path, variant]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                samples[variant].append(json.loads(out.strip().splitlines()[-1]))
    rows = {}
    print(f"checkpoint: {n_layers} Mixtral-shaped layers, {disk / 1e9:.2f} GB on disk (bf16)")
    print(f"{'variant':<16} {'load s':>7} {'GB/s':>6} {'peak RSS GB':>12} {'added / disk':>13}")
    for variant, runs in samples.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_rss"] for r in runs)
        added = statistics.median(r["peak_rss"] - r["before"] for r in runs)
        rows[variant] = dict(
            seconds=seconds,
            peak_rss_bytes=peak,
            added_rss_bytes=added,
            added_over_disk=added / disk,
        )
        print(
            f"{variant:<16} {seconds:7.2f} {disk / 1e9 / seconds:6.2f} {peak / 1e9:12.2f} "
            f"{added / disk:13.2f}"
        )
    write_results(
        args.out,
        dict(
            machine=platform.platform(),
            cpus=os.cpu_count(),
            disk_bytes=disk,
            n_layers=n_layers,
            runs=args.runs,
            variants=rows,
        ),
    )


if __name__ == "__main__":
    main()
