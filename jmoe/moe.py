"""Flax Linen MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

`MoE(config)` maps `[..., D] -> [..., D]` and returns `(y, stats)`. Parameters (float32 by
default) live under `router/kernel`, `experts/{w_gate,w_up,w_down}`, `shared/{w_gate,w_up,w_down}`
and `shared_gate/kernel`; the auxiliary-loss-free selection bias is the non-trainable variable
`moe_state/bias`, updated by the train step with `jmoe.losses.update_bias`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe import dispatch, losses, ops, routing
from jmoe.config import MoEConfig

STATE = "moe_state"
JITTER_RNG = "jitter"


def _fan_in_init(in_axis: int = -2, out_axis: int = -1, batch_axis=()):
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


def _mlp_weight_names(activation: str) -> tuple[str, ...]:
    return ("w_gate", "w_up") if activation == "swiglu" else ("w_up",)


class Router(nn.Module):
    """Router logits `x @ kernel` in float32, with optional multiplicative input jitter.

    Attributes:
      num_experts: router outputs E.
      jitter: Switch-style jitter eps: the router input is scaled by U(1 - eps, 1 + eps) when
        not deterministic (needs the "jitter" rng).
      param_dtype: dtype of `kernel` `[D, E]`.
    """

    num_experts: int
    jitter: float = 0.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_TxD: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = self.param(
            "kernel", _fan_in_init(), (x_TxD.shape[-1], self.num_experts), self.param_dtype
        )
        x_TxD = x_TxD.astype(jnp.float32)
        if self.jitter > 0 and not deterministic:
            noise = jax.random.uniform(
                self.make_rng(JITTER_RNG),
                x_TxD.shape,
                jnp.float32,
                1.0 - self.jitter,
                1.0 + self.jitter,
            )
            x_TxD = x_TxD * noise
        return jnp.dot(x_TxD, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class Experts(nn.Module):
    """E expert MLPs applied to rows sorted by expert (a grouped matmul per projection).

    Attributes:
      num_experts, d_ff: E and the hidden width F.
      activation: "swiglu" (`w_gate`, `w_up`, `w_down`) or "gelu" / "relu" (`w_up`, `w_down`).
      implementation: grouped-matmul implementation (see `jmoe.ops`).
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_experts: int
    d_ff: int
    activation: str = "swiglu"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_MxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        e, d, f = self.num_experts, x_MxD.shape[-1], self.d_ff
        init = _fan_in_init(batch_axis=(0,))
        w_in = tuple(
            self.param(name, init, (e, d, f), self.param_dtype).astype(self.dtype)
            for name in _mlp_weight_names(self.activation)
        )
        w_down = self.param("w_down", init, (e, f, d), self.param_dtype).astype(self.dtype)
        return ops.expert_mlp(
            x_MxD.astype(self.dtype),
            w_in,
            w_down,
            group_sizes_E,
            activation=self.activation,
            implementation=self.implementation,
        )


class SharedMLP(nn.Module):
    """The always-on shared expert(s), fused into one dense MLP of width `d_ff`."""

    d_ff: int
    activation: str = "swiglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        d = x_TxD.shape[-1]
        x_TxD = x_TxD.astype(self.dtype)
        pre = [
            jnp.dot(
                x_TxD,
                self.param(n, _fan_in_init(), (d, self.d_ff), self.param_dtype).astype(self.dtype),
            )
            for n in _mlp_weight_names(self.activation)
        ]
        w_down = self.param("w_down", _fan_in_init(), (self.d_ff, d), self.param_dtype)
        return jnp.dot(ops.ACTIVATIONS[self.activation](*pre), w_down.astype(self.dtype))


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer.

    Attributes:
      config: the layer's `MoEConfig`.
      mesh: optional `jax.sharding.Mesh`; an "expert" axis larger than 1 (expert parallelism)
        is not supported yet and raises.

    Call: `y, stats = MoE(cfg).apply(variables, x, deterministic=True, token_mask=None)` with
    `x` `[..., D]` (`[B, S, D]` for the sequence-wise balance loss) and an optional bool
    `token_mask` `[...]` (False for padding tokens, which are routed but left out of the losses
    and loads). `stats` holds float32 arrays: `load_balance_loss`, `z_loss`, `entropy`,
    `seq_balance_loss` (unscaled), `aux_loss` (the coefficient-weighted sum),
    `tokens_per_expert` `[E]`, `active_experts` (real expert computations per token) and
    `dropped_fraction`.

    Example:
      >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
      >>> x = jnp.ones((2, 3, 16))
      >>> variables = MoE(cfg).init(jax.random.key(0), x)
      >>> y, stats = MoE(cfg).apply(variables, x)
    """

    config: MoEConfig
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        self._check_mesh()
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input width {x.shape[-1]} != config.d_model={cfg.d_model}")
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_TxD = x.reshape(-1, cfg.d_model)
        mask_T = None if token_mask is None else token_mask.reshape(-1)
        bias = self.variable(STATE, "bias", jnp.zeros, (cfg.num_experts,), jnp.float32)

        logits = Router(cfg.num_experts, cfg.router_jitter, param_dtype, name="router")(
            x_TxD, deterministic
        )
        routed = routing.top_k(
            logits,
            cfg.top_k,
            score=cfg.score,
            normalize=cfg.normalize,
            scale=cfg.scale,
            bias=bias.value,
            n_groups=cfg.n_groups,
            top_groups=cfg.top_groups,
            renorm_when_k1=cfg.renorm_when_k1,
        )
        stats = self._router_stats(routed, mask_T, x.shape[-2] if x.ndim >= 2 else 1)

        kept, stats["dropped_fraction"] = routed, jnp.zeros((), jnp.float32)
        capacity = cfg.capacity(x_TxD.shape[0], deterministic)
        if capacity is not None:
            kept, stats["dropped_fraction"] = dispatch.apply_capacity(
                routed, cfg.num_experts, capacity
            )
        plan = dispatch.make_plan(kept, cfg.num_experts)
        experts = Experts(
            cfg.num_experts,
            cfg.d_ff,
            cfg.activation,
            cfg.implementation,
            dtype,
            param_dtype,
            name="experts",
        )
        y_MxD = experts(dispatch.permute(x_TxD.astype(dtype), plan), plan.group_sizes)
        y_TxD = dispatch.combine(y_MxD, plan, kept.weights)
        stats["active_experts"] = losses.masked_mean(kept.valid.sum(-1).astype(jnp.float32), mask_T)

        if cfg.shared_width:
            shared = SharedMLP(cfg.shared_width, cfg.activation, dtype, param_dtype, name="shared")(
                x_TxD
            )
            if cfg.shared_gate:
                gate = nn.Dense(
                    1,
                    use_bias=False,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=_fan_in_init(),
                    name="shared_gate",
                )(x_TxD)
                shared = jax.nn.sigmoid(gate) * shared
            y_TxD = y_TxD + shared.astype(dtype)
        return y_TxD.reshape(x.shape).astype(dtype), stats

    def _router_stats(self, routed: routing.Routing, mask_T, seq_len: int) -> dict:
        cfg = self.config
        stats = {
            "load_balance_loss": losses.load_balance(
                routed,
                num_experts=cfg.num_experts,
                normalization=cfg.lb_normalization,
                token_mask=mask_T,
            ),
            "z_loss": losses.router_z_loss(routed.logits, mask_T),
            "entropy": losses.routing_entropy(routed.probs, mask_T),
            "seq_balance_loss": losses.sequence_balance(
                routed, num_experts=cfg.num_experts, seq_len=seq_len, token_mask=mask_T
            ),
            "tokens_per_expert": losses.expert_counts(
                routed.expert_ids, routed.valid, cfg.num_experts, mask_T
            ),
        }
        stats["aux_loss"] = (
            cfg.lb_coef * stats["load_balance_loss"]
            + cfg.z_loss_coef * stats["z_loss"]
            + cfg.seq_balance_coef * stats["seq_balance_loss"]
        )
        return stats

    def _check_mesh(self):
        if self.mesh is not None and self.mesh.shape.get("expert", 1) > 1:
            raise NotImplementedError(
                f"expert parallelism (mesh axis expert={self.mesh.shape['expert']}) is not "
                "supported yet; use a mesh whose 'expert' axis is 1 or mesh=None"
            )
