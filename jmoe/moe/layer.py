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

from jmoe import kernels as ops
from jmoe import sharding
from jmoe.moe import dispatch, expert_parallel, gating, losses, routing
from jmoe.moe.config import MoEConfig

STATE = "moe_state"
JITTER_RNG = "jitter"


def _fan_in_init(in_axis: int = -2, out_axis: int = -1, batch_axis=()):
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


def _mlp_weight_names(activation: str) -> tuple[str, ...]:
    return ("w_gate", "w_up") if activation == "swiglu" else ("w_up",)


def mlp_matrix_count(activation: str) -> int:
    """Weight matrices of one expert MLP: its input projections and the down projection."""
    return len(_mlp_weight_names(activation)) + 1


class Router(nn.Module):
    """Router logits `x @ kernel` in float32, with optional multiplicative input jitter.

    Attributes:
      num_experts: router outputs E (true plus null experts).
      chain_steps: C independent routers for chain-of-experts; the kernel is `[D, E]` for
        C = 1 and `[C, D, E]` otherwise.
      jitter: Switch-style jitter eps: the router input is scaled by U(1 - eps, 1 + eps) when
        not deterministic (needs the "jitter" rng).
      param_dtype: dtype of `kernel`.
    """

    num_experts: int
    chain_steps: int = 1
    jitter: float = 0.0
    param_dtype: jnp.dtype = jnp.float32

    def __call__(self, x_TxD: jax.Array, step: int = 0, deterministic: bool = True) -> jax.Array:
        x_TxD, kernel_DxE = self.operands(x_TxD, step, deterministic)
        return jnp.dot(x_TxD, kernel_DxE, precision=jax.lax.Precision.HIGHEST)

    @nn.compact
    def operands(
        self, x_TxD: jax.Array, step: int = 0, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """The float32 router input (jittered in training) and step `step`'s kernel `[D, E]`,
        for a caller that fuses the matmul with the routing (`jmoe.ops.top_k_gating`)."""
        d, e = x_TxD.shape[-1], self.num_experts
        if self.chain_steps == 1:
            kernel = self.param("kernel", _fan_in_init(), (d, e), self.param_dtype)
        else:
            init = _fan_in_init(batch_axis=(0,))
            kernel = self.param("kernel", init, (self.chain_steps, d, e), self.param_dtype)[step]
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
        return x_TxD, kernel.astype(jnp.float32)


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
    def weights(self, d_model: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """The weights in the compute dtype: `w_in` `([E, D, F], ...)` and `w_down` `[E, F, D]`."""
        e, f = self.num_experts, self.d_ff
        init = _fan_in_init(batch_axis=(0,))
        w_in = tuple(
            self.param(name, init, (e, d_model, f), self.param_dtype).astype(self.dtype)
            for name in _mlp_weight_names(self.activation)
        )
        w_down = self.param("w_down", init, (e, f, d_model), self.param_dtype).astype(self.dtype)
        return w_in, w_down

    def __call__(self, x_MxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        w_in, w_down = self.weights(x_MxD.shape[-1])
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
    """Mixture-of-Experts FFN layer: route -> dispatch -> experts -> combine (+ shared experts).

    Routers: "top_k" (softmax / sigmoid, bias, groups), "null" (AdaMoE), "top_p" (dynamic) and
    "expert_choice"; `chain_steps > 1` runs chain-of-experts passes with one router each.

    Attributes:
      config: the layer's `MoEConfig`.
      mesh: optional `jax.sharding.Mesh` from `jmoe.sharding.make_mesh` (None: one device).
        Tokens are split over its batch axes ("data", "fsdp", "expert"); experts over "expert"
        and exchanged with all-to-all (`jmoe.expert_parallel`) when that axis is larger than 1.
        Routing, losses and statistics are computed on the global batch (the sums behind them
        are all-reduced), so outputs, statistics and gradients equal the one-device layer's when
        dropless. With a capacity factor the capacity applies per token shard (GShard groups):
        each shard of `T / shards` tokens keeps at most `config.capacity(T / shards)` slots per
        expert, the one-device rule when there is one shard. "expert_choice" is not supported
        with a mesh.

    Call: `y, stats = MoE(cfg).apply(variables, x, deterministic=True, token_mask=None)` with
    `x` `[..., D]` (`[B, S, D]` for the sequence-wise balance loss) and an optional bool
    `token_mask` `[...]` (False for padding tokens, which are routed but left out of the losses,
    loads and counts). With `mutable=["intermediates"]` the router's `Routing` of each chain
    step is returned too, under `intermediates/routing`. `stats` holds float32 arrays:
      - `load_balance_loss`, `z_loss`, `entropy`, `seq_balance_loss`: unscaled, summed over
        chain steps; `aux_loss`: their coefficient-weighted sum;
      - `tokens_per_expert`: `[E]` router assignments (`[C, E]` for a chain);
      - `active_experts`: mean real expert computations per token (all chain steps);
      - `active_experts_hist`: `[K * C + 1]` fraction of tokens with 0, 1, ... computations;
      - `expert_flops_per_token`: realised forward FLOPs of routed and shared experts;
      - `dropped_fraction`: valid slots of real (unmasked) tokens dropped by the capacity.
    Update `moe_state` after the optimizer step with `update_state`.

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
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input width {x.shape[-1]} != config.d_model={cfg.d_model}")
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_TxD = x.reshape(-1, cfg.d_model)
        self._check_mesh(x_TxD.shape[0])
        if self.mesh is not None:
            x_TxD = jax.lax.with_sharding_constraint(x_TxD, sharding.batch_sharding(self.mesh))
        mask_T = None if token_mask is None else token_mask.reshape(-1)
        seq_len = x.shape[-2] if x.ndim >= 2 else 1
        c = cfg.chain_steps
        bias_shape = (cfg.num_experts,) if c == 1 else (c, cfg.num_experts)
        bias = self.variable(STATE, "bias", jnp.zeros, bias_shape, jnp.float32).value
        budget = None
        if cfg.target_active_experts is not None:
            budget = self.variable(STATE, "budget", jnp.zeros, (), jnp.float32).value

        router = Router(cfg.num_router_outputs, c, cfg.router_jitter, param_dtype, name="router")
        experts = Experts(
            cfg.num_experts,
            cfg.d_ff,
            cfg.activation,
            cfg.implementation,
            dtype,
            param_dtype,
            name="experts",
        )
        shared = None
        if cfg.shared_width:
            shared = SharedMLP(cfg.shared_width, cfg.activation, dtype, param_dtype, name="shared")
        shared_gate = None
        if cfg.shared_gate:
            shared_gate = nn.Dense(
                1,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=_fan_in_init(),
                name="shared_gate",
            )

        h_TxD, sum_TxD, steps = x_TxD, None, []
        for step in range(c):
            if cfg.router == "top_k":
                routed = self._top_k(router.operands(h_TxD, step, deterministic), bias, step)
            else:
                logits = router(h_TxD, step, deterministic)
                routed = self._route(logits, budget, deterministic)
            self.sow("intermediates", "routing", routed)  # one per chain step, when asked for
            y_TxD, step_stats = self._step(routed, h_TxD, experts, mask_T, seq_len, deterministic)
            if shared is not None:
                s_TxD = shared(h_TxD)
                if shared_gate is not None:
                    s_TxD = jax.nn.sigmoid(shared_gate(h_TxD)) * s_TxD
                y_TxD = y_TxD + s_TxD.astype(dtype)
            sum_TxD = y_TxD if sum_TxD is None else sum_TxD + y_TxD
            h_TxD = h_TxD + y_TxD
            steps.append(step_stats)
        y_TxD = h_TxD if cfg.chain_residual == "coe" else sum_TxD
        return y_TxD.reshape(x.shape).astype(dtype), self._merge(steps, mask_T)

    def _top_k(self, operands, bias, step: int) -> routing.Routing:
        """Router matmul and top-k of chain step `step` through `ops.top_k_gating` (one fused
        Pallas kernel where `implementation` selects it; the XLA path on a mesh, where the
        routing runs on the global batch)."""
        cfg = self.config
        routed, _ = gating.top_k_gating(
            *operands,
            cfg.top_k,
            score=cfg.score,
            bias=bias if cfg.chain_steps == 1 else bias[step],
            normalize=cfg.normalize,
            scale=cfg.scale,
            n_groups=cfg.n_groups,
            top_groups=cfg.top_groups,
            renorm_when_k1=cfg.renorm_when_k1,
            implementation=cfg.implementation if self.mesh is None else "xla",
        )
        return routed

    def _route(self, logits, budget, deterministic) -> routing.Routing:
        """The routing of the "null", "top_p" and "expert_choice" routers."""
        cfg = self.config
        pressure = 0.0 if budget is None else budget
        if cfg.router == "null":
            return routing.null_experts(
                logits, cfg.top_k, num_null=cfg.num_null, null_offset=pressure
            )
        if cfg.router == "top_p":
            p = cfg.top_p if budget is None else jnp.clip(cfg.top_p - pressure, 1e-6, 1.0)
            return routing.top_p(logits, p, max_k=cfg.max_k, boundary=cfg.top_p_boundary)
        capacity = cfg.expert_choice_capacity(logits.shape[0], deterministic)
        return routing.expert_choice(logits, capacity)

    def _step(self, routed, h_TxD, experts, mask_T, seq_len, deterministic):
        """One routed pass: losses of the router's choice, then capacity, dispatch, combine."""
        cfg = self.config
        num_tokens = h_TxD.shape[0]
        stats = self._router_stats(routed, mask_T, seq_len)
        dtype = jnp.dtype(cfg.dtype)
        if self.mesh is not None:
            w_in, w_down = experts.weights(cfg.d_model)
            y_TxD, kept_valid = expert_parallel.expert_parallel_mlp(
                h_TxD.astype(dtype),
                routed,
                w_in,
                w_down,
                mesh=self.mesh,
                capacity=expert_parallel.local_capacity(
                    cfg.capacity, num_tokens, self.mesh, deterministic
                ),
                activation=cfg.activation,
                implementation=cfg.implementation,
            )
        else:
            y_TxD, kept_valid = self._dispatch_local(routed, h_TxD, experts, deterministic)
        stats["active_T"] = kept_valid.sum(-1)
        routed_slots = losses.masked_mean(routed.valid.sum(-1).astype(jnp.float32), mask_T)
        kept_slots = losses.masked_mean(stats["active_T"].astype(jnp.float32), mask_T)
        dropped = 1.0 - kept_slots / jnp.maximum(routed_slots, 1e-9)
        stats["dropped_fraction"] = jnp.where(routed_slots > 0, dropped, 0.0)
        return y_TxD, stats

    def _dispatch_local(self, routed, h_TxD, experts, deterministic):
        """One device: capacity, dispatch, experts, combine. Returns `(y_TxD, kept valid)`."""
        cfg = self.config
        num_tokens = h_TxD.shape[0]
        kept, max_rows = routed, None
        if cfg.router == "expert_choice":
            max_rows = cfg.num_experts * cfg.expert_choice_capacity(num_tokens, deterministic)
        elif (capacity := cfg.capacity(num_tokens, deterministic)) is not None:
            kept, _ = dispatch.apply_capacity(routed, cfg.num_experts, capacity)
            max_rows = cfg.num_experts * capacity
        plan = dispatch.make_plan(kept, cfg.num_experts, max_rows)
        y_RxD = experts(
            dispatch.permute(h_TxD.astype(jnp.dtype(cfg.dtype)), plan), plan.group_sizes
        )
        return dispatch.combine(y_RxD, plan, kept.weights), kept.valid

    def _router_stats(self, routed: routing.Routing, mask_T, seq_len: int) -> dict:
        """Loss terms and loads of one router's choice (before any capacity drop)."""
        cfg = self.config
        zero = jnp.zeros((), jnp.float32)
        stats = {
            "load_balance_loss": zero,  # expert choice is balanced by construction: no loss
            "z_loss": losses.router_z_loss(routed.logits, mask_T),
            "entropy": losses.routing_entropy(routed.probs, mask_T),
            "seq_balance_loss": zero,
            "tokens_per_expert": losses.expert_counts(
                routed.expert_ids, routed.valid, cfg.num_experts, mask_T
            ),
        }
        if cfg.router != "expert_choice":
            stats["load_balance_loss"] = losses.load_balance(
                routed,
                num_experts=cfg.num_experts,
                normalization=cfg.lb_normalization,
                num_null=cfg.num_null,
                null_balance=cfg.null_balance,
                token_mask=mask_T,
            )
        if cfg.router == "top_k":
            stats["seq_balance_loss"] = losses.sequence_balance(
                routed, num_experts=cfg.num_experts, seq_len=seq_len, token_mask=mask_T
            )
        return stats

    def _merge(self, steps: list[dict], mask_T) -> dict[str, jax.Array]:
        """Sums the loss terms of the chain steps and accounts the realised compute."""
        cfg = self.config
        loss_keys = ("load_balance_loss", "z_loss", "entropy", "seq_balance_loss")
        stats = {key: sum(s[key] for s in steps) for key in loss_keys}
        stats["aux_loss"] = (
            cfg.lb_coef * stats["load_balance_loss"]
            + cfg.z_loss_coef * stats["z_loss"]
            + cfg.seq_balance_coef * stats["seq_balance_loss"]
            + cfg.entropy_coef * stats["entropy"]
        )
        loads = [s["tokens_per_expert"] for s in steps]
        stats["tokens_per_expert"] = loads[0] if len(loads) == 1 else jnp.stack(loads)
        stats["dropped_fraction"] = sum(s["dropped_fraction"] for s in steps) / len(steps)
        active_T = sum(s["active_T"] for s in steps)
        stats["active_experts"] = losses.masked_mean(active_T.astype(jnp.float32), mask_T)
        num_bins = cfg.slots * cfg.chain_steps + 1
        stats["active_experts_hist"] = jnp.stack(
            [
                losses.masked_mean((active_T == n).astype(jnp.float32), mask_T)
                for n in range(num_bins)
            ]
        )
        flops_per_hidden_unit = 2 * cfg.d_model * mlp_matrix_count(cfg.activation)
        stats["expert_flops_per_token"] = flops_per_hidden_unit * (
            cfg.d_ff * stats["active_experts"] + cfg.shared_width * cfg.chain_steps
        )
        return stats

    def _check_mesh(self, num_tokens: int):
        cfg, mesh = self.config, self.mesh
        if mesh is None:
            return
        shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
        if num_tokens % shards:
            raise ValueError(
                f"tokens T={num_tokens} are not a multiple of the {shards} batch shards of mesh "
                f"{dict(mesh.shape)}: use a batch whose token count divides evenly"
            )
        if cfg.router == "expert_choice":
            raise NotImplementedError(
                "router='expert_choice' ranks tokens over the whole batch and is not supported "
                "with a mesh; use router='top_k' with capacity_factor set, or mesh=None"
            )


def update_state(
    config: MoEConfig, moe_state: dict[str, jax.Array], stats: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """The layer's `moe_state` after one training step, outside autodiff.

    Applies the auxiliary-loss-free bias step (`bias_update_rate > 0`) and the compute-budget
    controller (`target_active_experts` set) to the step's statistics (all-reduced over the
    batch when sharded).
    """
    state = dict(moe_state)
    if config.bias_update_rate > 0:
        state["bias"] = losses.update_bias(
            state["bias"], stats["tokens_per_expert"], config.bias_update_rate
        )
    if config.target_active_experts is not None:
        state["budget"] = losses.update_budget(
            state["budget"],
            stats["active_experts"],
            config.target_active_experts,
            config.budget_rate,
        )
    return jax.lax.stop_gradient(state)


def with_null_experts(params: dict, num_null: int) -> dict:
    """Converts a trained top-k MoE layer's params for `router="null"` (AdaMoE fine-tuning init).

    The router kernel `[..., D, E]` gains `num_null` columns that copy the true experts' columns
    in turn (column `E + j` copies column `j % E`), so every null expert starts with the logit of
    a true expert, as in the AdaMoE Mixtral recipe (ALGORITHMS.md §2.1). Other params are kept.

    Args:
      params: the layer's "params" collection (with "router"/"kernel").
      num_null: null experts to add, >= 0.
    """
    if num_null < 0:
        raise ValueError(f"with_null_experts: num_null={num_null} must be >= 0")
    kernel = params["router"]["kernel"]
    num_experts = kernel.shape[-1]
    null_cols = kernel[..., jnp.arange(num_null) % num_experts]
    router = {**params["router"], "kernel": jnp.concatenate([kernel, null_cols], axis=-1)}
    return {**params, "router": router}
