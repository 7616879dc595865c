"""`MoEConfig`: one MoE layer's schema, defaults and checks.

Its defaults are a plain top-2 softmax, Mixtral-style, dropless MoE with SwiGLU experts. The
routing rule is a router object (`jmoe.moe.routers`) that owns its own fields. `None` (never
`-1`) means "unset". Every field is checked at construction and a bad value raises a
`ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

from jmoe import validation
from jmoe.kernels import ACTIVATIONS, IMPLEMENTATIONS
from jmoe.kernels.quantization import QUANTIZATIONS
from jmoe.moe.losses import NORMALIZATIONS
from jmoe.moe.routers import Router, TopK
from jmoe.validation import DTYPES

CAPACITY_ROUNDINGS = ("ceil", "floor", "round")
CHAIN_RESIDUALS = ("prenorm", "coe")

_check = functools.partial(validation.check, owner="MoEConfig")
_check_choice = functools.partial(validation.check_choice, owner="MoEConfig")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    Attributes:
      d_model: model width D.
      d_ff: hidden width F of each routed expert.
      num_experts: routed experts E.
      router: the routing rule, a router object: `TopK(k=2)` (default), `NullExperts(...)`,
        `TopP(...)`, `ExpertChoice(...)` or any registered `jmoe.moe.routers.Router`.
      router_jitter: multiplicative router-input jitter eps (training only; 0 disables).
      chain_steps: chain-of-experts passes C >= 1, each with its own router; experts shared.
      chain_residual: "prenorm" returns the sum of the C step outputs (to be added to the
        residual stream by the caller; C=1 is the plain MoE); "coe" returns x + that sum, the
        paper's inner-residual form whose output replaces the stream.
      num_shared: number of always-on shared experts, fused into one MLP.
      d_ff_shared: hidden width of the fused shared MLP (default `num_shared * d_ff`).
      shared_gate: Qwen2-MoE sigmoid gate on the shared expert output.
      activation: expert MLP: "swiglu" or "clamped_swiglu" (gated: GPT-OSS's clamped unit,
        `jmoe.kernels.ClampedSwiGLU`), "gelu" or "relu" (two-matrix MLP).
      swiglu_alpha, swiglu_limit: the "clamped_swiglu" sigmoid slope and clamp (GPT-OSS's
        defaults); unused by the other activations.
      router_bias: a learned `router/bias` `[E_all]` (`[C, E_all]` for a chain) added to the
        router logits (GPT-OSS).
      expert_bias: per-expert biases `experts/b_gate`, `experts/b_up` `[E, F]` (only `b_up`
        for "gelu" / "relu") and `experts/b_down` `[E, D]`, added after each projection.
      capacity_factor: None for dropless; else each expert keeps at most
        `C = rounding(capacity_factor * K * T / E)` slots (K dropped if not
        `capacity_includes_k`); token-choice routers only (docs/algorithms.md, "Dispatch and
        capacity").
      eval_capacity_factor: capacity factor when `deterministic=True` (default: same).
      capacity_includes_k, capacity_rounding, min_capacity: the capacity rule.
      implementation: grouped-matmul implementation (None picks the fastest for the backend).
      expert_quantization: None (float experts), "int8" or "fp8" (float8 e4m3): the routed
        experts' `w_gate` / `w_up` / `w_down` are stored in that dtype with float32 column scales
        `experts/<name>_scale` and dequantised inside the grouped matmul
        (`jmoe.compress.quantize.quantize_experts` converts a trained model). Inference only: a
        quantized model cannot be trained, and "pallas" runs as "xla" for it.
      lb_coef: load-balance loss coefficient, for the `lb_normalization` named (expert choice
        is balanced by construction and has no such loss).
      lb_normalization: one of `NORMALIZATIONS` (docs/algorithms.md, "Load-balance loss").
      z_loss_coef: router z-loss coefficient.
      entropy_coef: routing-entropy ("dynamic") loss coefficient (top-p paper: 1e-4).
      dtype: compute dtype of the experts (the router always runs in float32).
      param_dtype: parameter dtype.
    """

    # Flat fields of earlier versions, now fields of a router object: old key -> new spelling
    # (the config loader names the new spelling when it meets an old key).
    MOVED_FIELDS: typing.ClassVar[dict[str, str]] = {
        "top_k": "router.k (router: {kind: top_k, k: 2})",
        "score": "router.score (router: {kind: top_k, score: sigmoid})",
        "normalize": "router.normalize",
        "renorm_when_k1": "router.renorm_when_k1",
        "scale": "router.scale",
        "n_groups": "router.n_groups",
        "top_groups": "router.top_groups",
        "bias_update_rate": "router.bias_update_rate",
        "seq_balance_coef": "router.seq_balance_coef",
        "num_null": "router.num_null (router: {kind: null_experts, num_null: 8, k: 4})",
        "null_balance": "router.null_balance (router: {kind: null_experts, ...})",
        "top_p": "router.p (router: {kind: top_p, p: 0.4})",
        "max_k": "router.max_k (router: {kind: top_p, ...})",
        "top_p_boundary": "router.boundary (router: {kind: top_p, ...})",
        "allow_noncausal": "router.allow_noncausal (router: {kind: expert_choice, ...})",
        "target_active_experts": "router.target_active_experts (null_experts or top_p routers)",
        "budget_rate": "router.budget_rate (null_experts or top_p routers)",
    }

    d_model: int = 256
    d_ff: int = 512
    num_experts: int = 8
    router: Router = TopK()
    router_jitter: float = 0.0
    chain_steps: int = 1
    chain_residual: str = "prenorm"
    num_shared: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_bias: bool = False
    expert_bias: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    capacity_includes_k: bool = True
    capacity_rounding: str = "ceil"
    min_capacity: int = 0
    implementation: str | None = None
    expert_quantization: str | None = None
    lb_coef: float = 0.01
    lb_normalization: str = "per_assignment_over_k"
    z_loss_coef: float = 0.0
    entropy_coef: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts", "chain_steps"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        if not isinstance(self.router, Router):
            raise ValueError(
                f"MoEConfig.router={self.router!r} is invalid: must be a router object such as "
                "jmoe.TopK(k=2), jmoe.NullExperts(num_null=8, k=4) or jmoe.TopP(p=0.4)"
            )
        try:
            self.router.check_layer(self.num_experts, self.chain_steps)
        except ValueError as e:
            raise ValueError(f"MoEConfig.router: {e}") from None
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check("swiglu_alpha", self.swiglu_alpha, self.swiglu_alpha > 0, "a number > 0")
        _check("swiglu_limit", self.swiglu_limit, self.swiglu_limit > 0, "a number > 0")
        _check_choice("lb_normalization", self.lb_normalization, NORMALIZATIONS)
        _check_choice("implementation", self.implementation, (None, *IMPLEMENTATIONS))
        _check_choice("expert_quantization", self.expert_quantization, (None, *QUANTIZATIONS))
        _check_choice("capacity_rounding", self.capacity_rounding, CAPACITY_ROUNDINGS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("chain_residual", self.chain_residual, CHAIN_RESIDUALS)
        self._check_capacity()
        _check(
            "d_ff_shared",
            self.d_ff_shared,
            self.d_ff_shared is None or self.d_ff_shared >= 1,
            "None (num_shared * d_ff) or an integer >= 1",
        )
        _check(
            "shared_gate",
            self.shared_gate,
            not self.shared_gate or self.shared_width > 0,
            "False unless a shared expert exists (num_shared >= 1 or d_ff_shared set)",
        )
        for name in ("lb_coef", "z_loss_coef", "entropy_coef"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0")
        _check("router_jitter", self.router_jitter, 0 <= self.router_jitter < 1, "in [0, 1)")

    def _check_capacity(self):
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _check(name, value, value is None or value > 0, "None (dropless) or a number > 0")
            _check(
                name,
                value,
                value is None or self.router.token_choice,
                f"None with router kind {self.router.kind!r}, which sets its own capacity",
            )
        for name in ("num_shared", "min_capacity"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "an integer >= 0")

    @property
    def num_router_outputs(self) -> int:
        """Router logits per token: E true experts plus any null experts."""
        return self.router.num_outputs(self.num_experts)

    @property
    def slots(self) -> int:
        """Routing slots K per token (and chain step) of the configured router."""
        return self.router.slots(self.num_experts)

    @property
    def expected_active_experts(self) -> float:
        """Expected expert computations per token over all chain steps (FLOP estimates)."""
        return self.router.expected_active(self.num_experts, self.chain_steps)

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared expert MLP (0 when there is none)."""
        return self.d_ff_shared if self.d_ff_shared is not None else self.num_shared * self.d_ff

    def capacity(self, num_tokens: int, deterministic: bool) -> int | None:
        """Slots per expert for `num_tokens` tokens, or None when dropless.

        The rule's K is the router's slots per token (`k` for top-k and null experts, null
        slots included; `max_k or E` for top-p).
        """
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor is None:
            return None
        k = self.slots if self.capacity_includes_k else 1
        raw = round(factor * k * num_tokens / self.num_experts, 9)  # 1.1 * 100 / 10 -> 11, not 12
        rounded = {"ceil": math.ceil, "floor": math.floor, "round": round}[self.capacity_rounding]
        return max(int(rounded(raw)), self.min_capacity)
