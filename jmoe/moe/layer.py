"""Flax Linen MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

`MoE(config)` maps `[..., D] -> [..., D]` and returns `(y, stats)`. Parameters (float32 by
default) live under `router/kernel` (and `router/bias` with `router_bias`),
`experts/{w_gate,w_up,w_down}` (and `experts/{b_gate,b_up,b_down}` with `expert_bias`; int8 /
fp8 with `experts/{w_gate,w_up,w_down}_scale` under `expert_quantization`),
`shared/{w_gate,w_up,w_down}` and `shared_gate/kernel`; the router's own non-trainable
variables (the top-k selection bias `moe_state/bias`, a compute budget `moe_state/budget`) are
updated after each optimizer step with `update_state`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe import kernels, sharding
from jmoe.kernels import quantization
from jmoe.moe import dispatch, expert_parallel, stats
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import Router
from jmoe.moe.routing import Routing

STATE = "moe_state"
JITTER_RNG = "jitter"


def _fan_in_init(in_axis: int = -2, out_axis: int = -1, batch_axis=()):
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


class Gate(nn.Module):
    """The router weights `kernel` (`[D, E]`, or `[C, D, E]` for a chain of C routers) and the
    routing rule applied to them: `x -> Routing`, in float32.

    Attributes:
      router: the routing rule (a `jmoe.moe.routers.Router`).
      num_outputs: router logits per token (true plus null experts).
      chain_steps: C independent routers for chain-of-experts.
      jitter: Switch-style jitter eps: the router input is scaled by U(1 - eps, 1 + eps) when
        not deterministic (needs the "jitter" rng).
      implementation: passed to `router.gate` (a fused gating kernel where one exists).
      param_dtype: dtype of `kernel`.
      use_bias: a learned logit bias `bias` (`[E]`, or `[C, E]`; zeros at init) added to the
        router logits before scoring.
    """

    router: Router
    num_outputs: int
    chain_steps: int = 1
    jitter: float = 0.0
    implementation: str | None = None
    param_dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(
        self, x_TxD: jax.Array, state: dict, step: int = 0, deterministic: bool = True
    ) -> Routing:
        d, e = x_TxD.shape[-1], self.num_outputs
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
        if self.use_bias:
            shape = (e,) if self.chain_steps == 1 else (self.chain_steps, e)
            bias = self.param("bias", nn.initializers.zeros_init(), shape, self.param_dtype)
            bias_E = bias if self.chain_steps == 1 else bias[step]
            # The bias joins the router matmul as one more input row against a constant-one
            # column, `[x, 1] @ [w; b] = x @ w + b`, so every router's gate (the fused gating
            # kernel included) adds it to the logits before scoring, with its gradient.
            x_TxD = jnp.concatenate([x_TxD, jnp.ones((x_TxD.shape[0], 1), jnp.float32)], -1)
            kernel = jnp.concatenate([kernel, bias_E[None, :]], axis=0)
        return self.router.gate(
            x_TxD,
            kernel.astype(jnp.float32),
            state,
            step=step,
            deterministic=deterministic,
            implementation=self.implementation,
        )


class ExpertWeights(NamedTuple):
    """The E expert MLPs' weights in the compute dtype: `w_in` (`(w_gate, w_up)` for the gated
    activations, `(w_up,)` for "gelu" / "relu"), each `[E, D, F]`, `w_down` `[E, F, D]`, and
    their biases (None without `expert_bias`): `b_in` one `[E, F]` per `w_in`, `b_down` `[E, D]`.
    Quantized weights stay in their int8 / fp8 dtype, with their float32 column scales
    `scales_in` (one `[E, F]` per `w_in`) and `scale_down` `[E, D]` (None when not quantized).
    """

    w_in: tuple[jax.Array, ...]
    w_down: jax.Array
    b_in: tuple[jax.Array, ...] | None = None
    b_down: jax.Array | None = None
    scales_in: tuple[jax.Array, ...] | None = None
    scale_down: jax.Array | None = None


class Experts(nn.Module):
    """The weights of E expert MLPs, returned as `ExpertWeights` by `Experts(...)(d_model)`.

    Parameters: `w_gate` / `w_up` `[E, D, F]`, `w_down` `[E, F, D]`; with `use_bias` also
    `b_gate` / `b_up` `[E, F]` and `b_down` `[E, D]` (zeros at init), named after their weights.
    With `quantization` ("int8" / "fp8") the weights are stored in that dtype beside float32
    column scales `w_gate_scale` / `w_up_scale` `[E, F]` and `w_down_scale` `[E, D]`
    (`jmoe.kernels.quantization`; init quantizes the float init); biases stay float.
    """

    num_experts: int
    d_ff: int
    activation: str = "swiglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    use_bias: bool = False
    quantization: str | None = None

    @nn.compact
    def __call__(self, d_model: int) -> ExpertWeights:
        e, f = self.num_experts, self.d_ff
        names = stats.mlp_weight_names(self.activation)
        w_in, scales_in = zip(*(self._weight(n, (e, d_model, f)) for n in names), strict=True)
        w_down, scale_down = self._weight("w_down", (e, f, d_model))
        quant = {}
        if self.quantization is not None:
            quant = dict(scales_in=scales_in, scale_down=scale_down)
        if not self.use_bias:
            return ExpertWeights(w_in, w_down, **quant)
        zeros = nn.initializers.zeros_init()
        b_in = tuple(
            self.param("b" + name[1:], zeros, (e, f), self.param_dtype).astype(self.dtype)
            for name in names
        )
        b_down = self.param("b_down", zeros, (e, d_model), self.param_dtype).astype(self.dtype)
        return ExpertWeights(w_in, w_down, b_in, b_down, **quant)

    def _weight(self, name: str, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """`(weight, scales)`: the float weight in the compute dtype and None, or the quantized
        weight as stored and its `<name>_scale`."""
        init = _fan_in_init(batch_axis=(0,))
        if self.quantization is None:
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype), None
        # 1. One float init, quantized into both parameters, so they must share its key. After
        #    initialization flax evaluates the init functions for their shapes only (under
        #    `eval_shape`), so any key serves then.
        key = self.make_rng("params") if self.is_initializing() else jax.random.key(0)

        def quantized():
            return quantization.quantize(init(key, shape, self.param_dtype), self.quantization)

        q = self.param(name, lambda _: quantized()[0])
        return q, self.param(name + "_scale", lambda _: quantized()[1])


class SharedMLP(nn.Module):
    """The always-on shared expert(s), fused into one dense MLP of width `d_ff`."""

    d_ff: int
    activation: str = "swiglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @nn.compact
    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        d = x_TxD.shape[-1]
        x_TxD = x_TxD.astype(self.dtype)
        pre = [
            jnp.dot(
                x_TxD,
                self.param(n, _fan_in_init(), (d, self.d_ff), self.param_dtype).astype(self.dtype),
            )
            for n in stats.mlp_weight_names(self.activation)
        ]
        w_down = self.param("w_down", _fan_in_init(), (self.d_ff, d), self.param_dtype)
        act = kernels.activation_fn(
            self.activation, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit
        )
        return jnp.dot(act(*pre), w_down.astype(self.dtype))


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer: route -> dispatch -> experts -> combine (+ shared experts).

    The routing rule is `config.router` (`TopK`, `NullExperts`, `TopP`, `ExpertChoice` or any
    registered router); `chain_steps > 1` runs chain-of-experts passes with one router each.

    Attributes:
      config: the layer's `MoEConfig`.
      mesh: optional `jax.sharding.Mesh` from `jmoe.sharding.make_mesh` (None: one device).
        Tokens are split over its batch axes ("data", "fsdp", "expert"); experts over "expert"
        and exchanged with all-to-all (`jmoe.moe.expert_parallel`) when that axis is larger
        than 1. Routing, losses and statistics are computed on the global batch (the sums
        behind them are all-reduced), so outputs, statistics and gradients equal the one-device
        layer's when dropless. With a capacity factor the capacity applies per token shard
        (GShard groups): each shard of `T / shards` tokens keeps at most
        `config.capacity(T / shards)` slots per expert, the one-device rule when there is one
        shard. Expert choice is not supported with a mesh.

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

    Examples:
      >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, router=TopK(k=2))
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
        initial = cfg.router.init_state(cfg.num_experts, cfg.chain_steps)
        state = {
            name: self.variable(STATE, name, lambda v=value: v).value
            for name, value in initial.items()
        }
        gate = router_gate(cfg, self.mesh)
        experts = Experts(
            cfg.num_experts,
            cfg.d_ff,
            cfg.activation,
            dtype,
            param_dtype,
            cfg.expert_bias,
            cfg.expert_quantization,
            name="experts",
        )(cfg.d_model)
        shared = shared_experts(cfg)

        h_TxD, sum_TxD, steps = x_TxD, None, []
        for step in range(cfg.chain_steps):
            routed = gate(h_TxD, state, step, deterministic)
            self.sow("intermediates", "routing", routed)  # one per chain step, when asked for
            y_TxD, kept_valid = self._routed_experts(
                h_TxD.astype(dtype), routed, experts, deterministic
            )
            steps.append(
                stats.step_stats(cfg, routed, kept_valid, seq_len=seq_len, token_mask=mask_T)
            )
            if shared is not None:
                y_TxD = y_TxD + shared_output(shared, h_TxD).astype(dtype)
            sum_TxD = y_TxD if sum_TxD is None else sum_TxD + y_TxD
            h_TxD = h_TxD + y_TxD
        y_TxD = h_TxD if cfg.chain_residual == "coe" else sum_TxD
        return y_TxD.reshape(x.shape).astype(dtype), stats.layer_stats(cfg, steps, mask_T)

    def _routed_experts(
        self, x_TxD, routed: Routing, experts: ExpertWeights, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Capacity, dispatch, expert MLPs and combine of one routing, on one device or across
        the mesh. Returns `(y_TxD, kept valid [T, K])`.

        Only kept slots get a row, and an unused or dropped slot's combine weight is 0, so the
        expert biases reach no empty slot."""
        cfg = self.config
        num_tokens = x_TxD.shape[0]
        mlp_options = expert_mlp_options(cfg)
        if self.mesh is not None:
            return expert_parallel.expert_parallel_mlp(
                x_TxD,
                routed,
                experts.w_in,
                experts.w_down,
                b_in=experts.b_in,
                b_down_ExD=experts.b_down,
                scales_in=experts.scales_in,
                scale_down_ExD=experts.scale_down,
                mesh=self.mesh,
                capacity=expert_parallel.local_capacity(
                    cfg.capacity, num_tokens, self.mesh, deterministic
                ),
                **mlp_options,
            )
        kept = routed
        max_rows = cfg.router.max_rows(num_tokens, cfg.num_experts, deterministic)
        if (capacity := cfg.capacity(num_tokens, deterministic)) is not None:
            kept, _ = dispatch.apply_capacity(routed, cfg.num_experts, capacity)
            max_rows = cfg.num_experts * capacity
        plan = dispatch.make_plan(kept, cfg.num_experts, max_rows)
        y_RxD = kernels.expert_mlp(
            dispatch.permute(x_TxD, plan),
            experts.w_in,
            experts.w_down,
            plan.group_sizes,
            b_in=experts.b_in,
            b_down_GxD=experts.b_down,
            scales_in=experts.scales_in,
            scale_down_GxD=experts.scale_down,
            **mlp_options,
        )
        return dispatch.combine(y_RxD, plan, kept.weights), kept.valid

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
        if not cfg.router.token_choice:
            raise NotImplementedError(
                f"router kind {cfg.router.kind!r} ranks tokens over the whole batch and is not "
                "supported with a mesh; use a TopK router with capacity_factor set, or mesh=None"
            )


def router_gate(cfg: MoEConfig, mesh: jax.sharding.Mesh | None = None) -> Gate:
    """The layer's `router` submodule as `MoE` builds it (apply it alone to
    `params["router"]` to route without running the experts)."""
    return Gate(
        cfg.router,
        cfg.num_router_outputs,
        cfg.chain_steps,
        cfg.router_jitter,
        cfg.implementation if mesh is None else "xla",  # global-batch routing on a mesh
        jnp.dtype(cfg.param_dtype),
        cfg.router_bias,
        name="router",
    )


def shared_experts(cfg: MoEConfig) -> tuple[SharedMLP, nn.Dense | None] | None:
    """The layer's `shared` MLP and optional `shared_gate` submodules (None without shared
    experts)."""
    if not cfg.shared_width:
        return None
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    shared = SharedMLP(
        cfg.shared_width,
        cfg.activation,
        dtype,
        param_dtype,
        cfg.swiglu_alpha,
        cfg.swiglu_limit,
        name="shared",
    )
    if not cfg.shared_gate:
        return shared, None
    gate = nn.Dense(
        1,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_fan_in_init(),
        name="shared_gate",
    )
    return shared, gate


def shared_output(shared: tuple[SharedMLP, nn.Dense | None], h_TxD: jax.Array) -> jax.Array:
    """The shared experts' output for `h_TxD`, sigmoid-gated when the layer has a gate."""
    mlp, gate = shared
    s_TxD = mlp(h_TxD)
    return s_TxD if gate is None else jax.nn.sigmoid(gate(h_TxD)) * s_TxD


def expert_mlp_options(cfg: MoEConfig) -> dict:
    """The keyword arguments of `jmoe.kernels.expert_mlp` for the layer's routed experts."""
    return dict(
        activation=cfg.activation,
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        implementation=cfg.implementation,
    )


def update_state(
    config: MoEConfig, moe_state: dict[str, jax.Array], stats: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """The layer's `moe_state` after one training step, outside autodiff.

    The router updates its own variables from the step's statistics (all-reduced over the batch
    when sharded): the auxiliary-loss-free bias step of `TopK(bias_update_rate > 0)`, the
    compute-budget controller of a router with `target_active_experts` set.
    """
    return jax.lax.stop_gradient(config.router.update_state(dict(moe_state), stats))


def with_null_experts(params: dict, num_null: int) -> dict:
    """Converts a trained top-k MoE layer's params for a `NullExperts` router (AdaMoE
    fine-tuning init).

    The router kernel `[..., D, E]` gains `num_null` columns that copy the true experts' columns
    in turn (column `E + j` copies column `j % E`), so every null expert starts with the logit of
    a true expert, as in the AdaMoE Mixtral recipe (docs/algorithms.md, "Null experts (AdaMoE)");
    a learned logit bias `router/bias` `[..., E]` is extended the same way. Other params are
    kept. Leading axes (a chain's `[C, ...]`, a scanned stack's layers) are kept too.

    Args:
      params: the layer's "params" collection (with "router"/"kernel").
      num_null: null experts to add, >= 0.
    """
    if num_null < 0:
        raise ValueError(f"with_null_experts: num_null={num_null} must be >= 0")
    num_experts = params["router"]["kernel"].shape[-1]
    copies = jnp.arange(num_null) % num_experts
    router = {
        name: jnp.concatenate([a, a[..., copies]], axis=-1) if name in ("kernel", "bias") else a
        for name, a in params["router"].items()
    }
    return {**params, "router": router}
