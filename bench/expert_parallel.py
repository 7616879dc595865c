"""Expert-parallel communication and step time on 8 host CPU devices (or the real devices).

Two tables:
- bytes exchanged per token per MoE layer (forward: dispatch + combine; the backward pass moves
  the same again) for each router on the expert mesh axis of size n:
    * "buffer": what the fixed-size `all_to_all` moves, the worst-case chunks of
      `jmoe.expert_parallel` (`T_l * min(K, E_l)` rows per destination when dropless), counting
      the (n-1)/n of every buffer that leaves the device;
    * "payload": the rows that must leave their device, i.e. the kept slots whose expert lives
      on another device (what a `ragged_all_to_all` moves); unused slots (null experts, top-p
      cut-offs, capacity drops) send nothing.
- forward+backward step time of the layer with experts split over "expert" (all-to-all) against
  experts replicated on every device (the same tokens split over "data", no exchange).

    python bench/expert_parallel.py                          # 8 CPU devices, expert axis 8
    python bench/expert_parallel.py --data 2 --expert 4 --tokens 8192
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

if "--real-devices" not in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from results_io import median_seconds, write_results  # noqa: E402

import jmoe  # noqa: E402
from jmoe import sharding
from jmoe.moe import expert_parallel  # noqa: E402
from jmoe.sharding import MeshConfig  # noqa: E402


def routers(e: int) -> dict[str, dict]:
    """Router settings compared at E experts (top-k over k, then the adaptive ones)."""
    out = {f"top_k k={k}": dict(router=jmoe.TopK(k=k)) for k in (1, 2, 4, 8) if k <= e}
    out["null k=4 (E null)"] = dict(router=jmoe.NullExperts(k=4, num_null=e))
    out["top_p p=0.5 max_k=4"] = dict(router=jmoe.TopP(p=0.5, max_k=4))
    out["top_k k=2 capacity 1.0"] = dict(capacity_factor=1.0, router=jmoe.TopK(k=2))
    return out


def bytes_per_token(cfg, variables, x, mesh) -> dict:
    """Buffer and payload bytes per token for one layer's forward pass, from its routing."""
    n = sharding.axis_size(mesh, "expert")
    shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
    t = x.shape[0] * x.shape[1]
    t_l, e_l = t // shards, cfg.num_experts // n
    capacity = expert_parallel.local_capacity(cfg.capacity, t, mesh)
    apply = functools.partial(jmoe.MoE(cfg).apply, mutable=["intermediates"])
    (_, stats), sown = jax.jit(apply)(variables, x)
    (routed,) = sown["intermediates"]["routing"]
    ids = np.asarray(routed.expert_ids)
    valid = np.asarray(routed.valid)
    if capacity is not None:  # drop per token shard, as the layer does
        valid = np.concatenate(
            [np.asarray(_kept(cfg, routed, i * t_l, t_l, capacity)) for i in range(shards)]
        )
    row_bytes = cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    chunk = expert_parallel.chunk_rows(t_l, cfg.slots, e_l, capacity)
    buffer = 2 * n * chunk * row_bytes * (n - 1) / n / t_l
    src_device = (np.arange(t) // t_l) % n  # the "expert" coordinate of the token's shard
    dest_device = np.minimum(ids, cfg.num_experts - 1) // e_l
    remote = valid & (dest_device != src_device[:, None])
    payload = 2 * remote.sum() * row_bytes / t
    return {
        "active_experts": float(stats["active_experts"]),
        "buffer_bytes": float(buffer),
        "payload_bytes": float(payload),
    }


def _kept(cfg, routed, start, size, capacity):
    part = jax.tree.map(lambda a: a[start : start + size], routed)
    return jmoe.dispatch.apply_capacity(part, cfg.num_experts, capacity)[0].valid


def step_time(cfg, variables, x, mesh, runs: int) -> float:
    """Median seconds of a jitted forward+backward of the layer on `mesh`."""
    model = jmoe.MoE(cfg, mesh=mesh)
    ct = jax.random.normal(jax.random.key(3), x.shape)

    @jax.jit
    def fwd_bwd(params, x):
        def loss(params, x):
            y, stats = model.apply({**variables, "params": params}, x)
            return jnp.sum(y * ct) + stats["aux_loss"]

        return jax.grad(loss, (0, 1))(params, x)

    params = sharding.shard_params(variables["params"], mesh)
    x = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    return median_seconds(fwd_bwd, (params, x), runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--expert", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--real-devices", action="store_true", help="no forced CPU devices")
    parser.add_argument("--out", default="bench/results/expert_parallel.json")
    args = parser.parse_args()

    ep_mesh = sharding.make_mesh(MeshConfig(data=args.data, expert=args.expert))
    dp_mesh = sharding.make_mesh(MeshConfig(data=args.data * args.expert, expert=1))
    x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq, args.seq, args.d_model))
    rows = []
    header = f"{'router':<24}{'active':>8}{'buffer B/tok':>14}{'payload B/tok':>15}"
    header += f"{'EP step s':>11}{'replicated s':>14}{'EP/rep':>8}"
    print(f"mesh {dict(ep_mesh.shape)}, E={args.experts}, T={args.tokens}, D={args.d_model}")
    print(header)
    for name, kw in routers(args.experts).items():
        cfg = jmoe.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, **kw)
        variables = jmoe.MoE(cfg).init(jax.random.key(1), x)
        row = {"router": name, **bytes_per_token(cfg, variables, x, ep_mesh)}
        row["ep_step_s"] = step_time(cfg, variables, x, ep_mesh, args.runs)
        row["replicated_step_s"] = step_time(cfg, variables, x, dp_mesh, args.runs)
        rows.append(row)
        print(
            f"{name:<24}{row['active_experts']:>8.2f}{row['buffer_bytes']:>14.0f}"
            f"{row['payload_bytes']:>15.0f}{row['ep_step_s']:>11.4f}"
            f"{row['replicated_step_s']:>14.4f}"
            f"{row['ep_step_s'] / row['replicated_step_s']:>8.2f}"
        )
    meta = {
        "mesh": dict(ep_mesh.shape),
        "args": vars(args),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "machine": platform.machine(),
    }
    write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
