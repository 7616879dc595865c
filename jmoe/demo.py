"""A first run: fit a MoE layer to a random teacher MoE for a few steps and print its stats.

The training issue replaces this with the language-model trainer; until then `python train.py`
runs this demo so a fresh checkout shows routing, dispatch, experts and losses working end to end.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from jmoe.config import MoEConfig
from jmoe.moe import MoE, update_state


def run(
    config: MoEConfig | None = None,
    *,
    steps: int = 60,
    batch: int = 8,
    seq: int = 64,
    seed: int = 0,
    log_every: int = 10,
) -> dict[str, float]:
    """Trains `MoE(config)` to match a random teacher MoE; returns the final stats as floats."""
    cfg = config or MoEConfig(
        d_model=64,
        d_ff=128,
        num_experts=8,
        top_k=2,
        num_shared=1,
        z_loss_coef=1e-3,
        bias_update_rate=1e-3,
    )
    print(f"devices: {jax.devices()}")
    print(f"config: {cfg}")
    k_teacher, k_student, k_data = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_data, (batch, seq, cfg.d_model))
    teacher = MoE(cfg)
    target, _ = teacher.apply(teacher.init(k_teacher, x), x)
    model = MoE(cfg)
    variables = model.init(k_student, x)
    params, state = variables["params"], variables["moe_state"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, state, opt_state):
        def loss_fn(p):
            y, stats = model.apply({"params": p, "moe_state": state}, x, deterministic=False)
            return jnp.mean((y - target) ** 2) + stats["aux_loss"], stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        state = update_state(cfg, state, stats)
        return optax.apply_updates(params, updates), state, opt_state, loss, stats

    start = time.perf_counter()
    for i in range(1, steps + 1):
        params, state, opt_state, loss, stats = step(params, state, opt_state)
        if i % log_every == 0 or i == 1:
            load = stats["tokens_per_expert"]
            print(
                f"step {i:4d}  loss {float(loss):.4f}  lb {float(stats['load_balance_loss']):.3f}"
                f"  z {float(stats['z_loss']):.3f}  active/token "
                f"{float(stats['active_experts']):.2f}  load max/mean "
                f"{float(load.max() / load.mean()):.2f}"
            )
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    summary = {"loss": float(loss)}
    summary.update({k: float(v) for k, v in stats.items() if v.ndim == 0})
    return summary
