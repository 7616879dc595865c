"""A few training steps of a tiny MoE layer, one process of a multi-process run or a single one.

`python tests/sharding_multiprocess.py PORT PROCESS_ID NUM_PROCESSES OUT.json`: each process owns
2 host CPU devices, joins the `jax.distributed` runtime on localhost:PORT with gloo collectives,
loads only its rows of every global batch and trains on a data x expert mesh over all devices.
`NUM_PROCESSES = 0` runs the same steps on one device without a mesh. Process 0 writes the losses.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if "JMOE_JAX_CACHE" in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ["JMOE_JAX_CACHE"])

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jmoe  # noqa: E402
from jmoe import sharding  # noqa: E402
from jmoe.sharding import MeshConfig  # noqa: E402

CFG = jmoe.MoEConfig(
    d_model=8, d_ff=16, num_experts=4, lb_coef=0.1, z_loss_coef=0.01, router=jmoe.TopK(k=2)
)
BATCH, SEQ, STEPS = 8, 4, 3


def global_batch():
    x = np.random.default_rng(0).normal(size=(BATCH, SEQ, CFG.d_model)).astype(np.float32)
    return x, np.tanh(x[..., ::-1])


def train(mesh) -> list[float]:
    model = jmoe.MoE(CFG, mesh=mesh)
    init = lambda: jmoe.MoE(CFG).init(jax.random.key(0), jnp.zeros((BATCH, SEQ, CFG.d_model)))  # noqa: E731
    variables = jax.jit(init)() if mesh is None else sharding.init_sharded(init, mesh)
    params = variables["params"]
    tx = optax.adam(1e-2)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, x, target):
        def loss_fn(params):
            y, stats = model.apply({**variables, "params": params}, x)
            return jnp.mean((y - target) ** 2) + stats["aux_loss"]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        x, target = global_batch()
        if mesh is not None:  # each process loads only its rows
            rows = sharding.process_batch_slice(BATCH, mesh)
            x, target = sharding.shard_batch((x[rows], target[rows]), mesh)
        params, opt_state, loss = step(params, opt_state, x, target)
        losses.append(float(loss))
    return losses


def main(port: int, process_id: int, num_processes: int, out: str):
    mesh = None
    if num_processes:
        sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
        assert jax.process_count() == num_processes, jax.process_count()
        mesh = sharding.make_mesh(MeshConfig(data=None, expert=2))
    losses = train(mesh)
    if process_id == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
