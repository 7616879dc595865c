"""`MoEConfig`: one MoE layer's schema, defaults and checks.

Its defaults are a plain top-2 softmax, Mixtral-style, dropless MoE with SwiGLU experts. `None`
(never `-1`) means "unset". Every field is checked at construction and a bad value raises a
`ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp

from jmoe import validation
from jmoe.kernels import ACTIVATIONS as _OPS_ACTIVATIONS
from jmoe.kernels import IMPLEMENTATIONS as _OPS_IMPLEMENTATIONS
from jmoe.moe.losses import NORMALIZATIONS as LB_NORMALIZATIONS
from jmoe.moe.losses import NULL_BALANCES
from jmoe.moe.routing import SCORES, TOP_P_BOUNDARIES
from jmoe.validation import DTYPES

_check = functools.partial(validation.check, owner="MoEConfig")
_check_choice = functools.partial(validation.check_choice, owner="MoEConfig")

ROUTERS = ("top_k", "null", "top_p", "expert_choice")
ACTIVATIONS = tuple(_OPS_ACTIVATIONS)
IMPLEMENTATIONS = (None, *_OPS_IMPLEMENTATIONS)
CAPACITY_ROUNDINGS = ("ceil", "floor", "round")
CHAIN_RESIDUALS = ("prenorm", "coe")
BUDGET_ROUTERS = ("null", "top_p")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    Attributes:
      d_model: model width D.
      d_ff: hidden width F of each routed expert.
      num_experts: routed experts E.
      router: router kind, one of `ROUTERS`.
      top_k: experts per token k.
      score: "softmax" or "sigmoid" router scores.
      normalize: renormalise the k weights (only when k > 1 unless `renorm_when_k1`).
      renorm_when_k1: renormalise a single weight too (HF parity; cuts the router gradient).
      scale: routed scaling factor applied to the weights.
      n_groups, top_groups: DeepSeek-V3 group-limited selection (both or neither).
      num_null: AdaMoE null experts (router "null"); `top_k` then counts null picks too.
      null_balance: load balance of null experts, "grouped" (paper) or "individual".
      top_p: threshold of the "top_p" router, in (0, 1].
      max_k: optional cap on experts per token for "top_p" (default: all experts).
      top_p_boundary: "strict" (cumulative > p, official) or "inclusive" (>= p).
      allow_noncausal: must be True to use "expert_choice", which lets a token's routing depend
        on later tokens (not causal).
      chain_steps: chain-of-experts passes C >= 1, each with its own router; experts shared.
      chain_residual: "prenorm" returns the sum of the C step outputs (to be added to the
        residual stream by the caller; C=1 is the plain MoE); "coe" returns x + that sum, the
        paper's inner-residual form whose output replaces the stream.
      target_active_experts: compute budget: a controller in `moe_state/budget` (null logit
        offset or top-p threshold shift) holds the mean active experts per token at this value.
      budget_rate: step size of the budget controller.
      num_shared: number of always-on shared experts, fused into one MLP.
      d_ff_shared: hidden width of the fused shared MLP (default `num_shared * d_ff`).
      shared_gate: Qwen2-MoE sigmoid gate on the shared expert output.
      activation: expert MLP: "swiglu" (gated), "gelu" or "relu" (two-matrix MLP).
      capacity_factor: None for dropless; else capacity per expert
        `C = rounding(capacity_factor * k * T / E)` (k dropped if not `capacity_includes_k`).
      eval_capacity_factor: capacity factor when `deterministic=True` (default: same).
      capacity_includes_k, capacity_rounding, min_capacity: capacity rule (ALGORITHMS.md §1.4).
      implementation: grouped-matmul implementation (None picks the fastest for the backend).
      lb_coef: load-balance loss coefficient, for the `lb_normalization` named.
      lb_normalization: one of `LB_NORMALIZATIONS` (ALGORITHMS.md §0.1).
      z_loss_coef: router z-loss coefficient.
      seq_balance_coef: DeepSeek-V3 sequence-wise balance loss coefficient.
      entropy_coef: routing-entropy ("dynamic") loss coefficient (top-p paper: 1e-4).
      bias_update_rate: auxiliary-loss-free balancing rate (0 disables the update).
      router_jitter: multiplicative router-input jitter eps (training only; 0 disables).
      dtype: compute dtype of the experts (the router always runs in float32).
      param_dtype: parameter dtype.
    """

    d_model: int = 256
    d_ff: int = 512
    num_experts: int = 8
    router: str = "top_k"
    top_k: int = 2
    score: str = "softmax"
    normalize: bool = True
    renorm_when_k1: bool = False
    scale: float = 1.0
    n_groups: int | None = None
    top_groups: int | None = None
    num_null: int = 0
    null_balance: str = "grouped"
    top_p: float = 0.4
    max_k: int | None = None
    top_p_boundary: str = "strict"
    allow_noncausal: bool = False
    chain_steps: int = 1
    chain_residual: str = "prenorm"
    target_active_experts: float | None = None
    budget_rate: float = 0.01
    num_shared: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    activation: str = "swiglu"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    capacity_includes_k: bool = True
    capacity_rounding: str = "ceil"
    min_capacity: int = 0
    implementation: str | None = None
    lb_coef: float = 0.01
    lb_normalization: str = "per_assignment_over_k"
    z_loss_coef: float = 0.0
    seq_balance_coef: float = 0.0
    entropy_coef: float = 0.0
    bias_update_rate: float = 0.0
    router_jitter: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        _check_choice("router", self.router, ROUTERS)
        _check_choice("score", self.score, SCORES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("lb_normalization", self.lb_normalization, LB_NORMALIZATIONS)
        _check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        _check_choice("capacity_rounding", self.capacity_rounding, CAPACITY_ROUNDINGS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("null_balance", self.null_balance, NULL_BALANCES)
        _check_choice("top_p_boundary", self.top_p_boundary, TOP_P_BOUNDARIES)
        _check_choice("chain_residual", self.chain_residual, CHAIN_RESIDUALS)
        self._check_adaptive()
        _check(
            "top_k",
            self.top_k,
            self.top_k <= self.num_experts + self.num_null,
            f"at most num_experts + num_null={self.num_experts + self.num_null}",
        )
        self._check_groups()
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _check(name, value, value is None or value > 0, "None (dropless) or a number > 0")
        for name in ("num_shared", "min_capacity"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "an integer >= 0")
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
        for name in (
            "lb_coef",
            "z_loss_coef",
            "seq_balance_coef",
            "entropy_coef",
            "bias_update_rate",
            "budget_rate",
        ):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0")
        _check("router_jitter", self.router_jitter, 0 <= self.router_jitter < 1, "in [0, 1)")

    def _check_adaptive(self):
        _check("num_null", self.num_null, self.num_null >= 0, "an integer >= 0")
        _check(
            "num_null",
            self.num_null,
            self.num_null == 0 or self.router == "null",
            f"0 unless router='null' (router={self.router!r})",
        )
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        top_k_only = self.router == "top_k"
        _check(
            "score",
            self.score,
            top_k_only or self.score == "softmax",
            f"'softmax' with router={self.router!r} (sigmoid scores are for router='top_k')",
        )
        _check(
            "n_groups",
            self.n_groups,
            top_k_only or self.n_groups is None,
            f"None with router={self.router!r} (group limits are for router='top_k')",
        )
        _check(
            "bias_update_rate",
            self.bias_update_rate,
            top_k_only or self.bias_update_rate == 0,
            f"0 with router={self.router!r} (the selection bias is for router='top_k')",
        )
        _check(
            "max_k",
            self.max_k,
            self.max_k is None or 1 <= self.max_k <= self.num_experts,
            f"None or in [1, num_experts={self.num_experts}]",
        )
        _check("chain_steps", self.chain_steps, self.chain_steps >= 1, "an integer >= 1")
        _check(
            "allow_noncausal",
            self.allow_noncausal,
            self.router != "expert_choice" or self.allow_noncausal,
            "True to use router='expert_choice', which is not causal: a token's experts "
            "depend on later tokens, so a causal LM would see the future",
        )
        if self.target_active_experts is not None:
            _check(
                "target_active_experts",
                self.target_active_experts,
                self.router in BUDGET_ROUTERS,
                f"None unless router is one of {BUDGET_ROUTERS}",
            )
            _check(
                "target_active_experts",
                self.target_active_experts,
                0 < self.target_active_experts <= self.slots * self.chain_steps,
                f"in (0, {self.slots * self.chain_steps}] (slots x chain_steps)",
            )

    @property
    def num_router_outputs(self) -> int:
        """Router logits per token: E true experts plus the null experts."""
        return self.num_experts + self.num_null

    @property
    def slots(self) -> int:
        """Routing slots K per token (and chain step) of the configured router."""
        if self.router == "top_p":
            return self.max_k or self.num_experts
        if self.router == "expert_choice":
            return self.num_experts
        return self.top_k

    def _check_groups(self):
        if self.n_groups is None and self.top_groups is None:
            return
        if self.n_groups is None or self.top_groups is None:
            raise ValueError(
                f"n_groups={self.n_groups} and top_groups={self.top_groups}: group-limited "
                "routing needs both set (or both None)"
            )
        _check(
            "n_groups",
            self.n_groups,
            self.n_groups >= 1 and self.num_experts % self.n_groups == 0,
            f"a divisor of num_experts={self.num_experts}",
        )
        _check(
            "top_groups",
            self.top_groups,
            1 <= self.top_groups <= self.n_groups,
            f"in [1, n_groups={self.n_groups}]",
        )
        eligible = self.top_groups * (self.num_experts // self.n_groups)
        _check(
            "top_k",
            self.top_k,
            self.top_k <= eligible,
            f"at most {eligible} (experts in top_groups={self.top_groups} groups)",
        )

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared expert MLP (0 when there is none)."""
        return self.d_ff_shared if self.d_ff_shared is not None else self.num_shared * self.d_ff

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def _capacity_factor(self, deterministic: bool) -> float | None:
        if deterministic and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def expert_choice_capacity(self, num_tokens: int, deterministic: bool = True) -> int:
        """Tokens each expert takes with router "expert_choice": `round(cf * T / E)` in [1, T],
        where the capacity factor (experts per token on average) defaults to `top_k`."""
        factor = self._capacity_factor(deterministic)
        factor = self.top_k if factor is None else factor
        return min(max(round(factor * num_tokens / self.num_experts), 1), num_tokens)

    def capacity(self, num_tokens: int, deterministic: bool) -> int | None:
        """Slots per expert for `num_tokens` tokens, or None when dropless (token-choice).

        `top_k` is the k of the rule for every token-choice router: the expected experts per
        token (for "top_p", set it to the expected count; for "null" it counts null slots too).
        """
        factor = self._capacity_factor(deterministic)
        if factor is None:
            return None
        k = self.top_k if self.capacity_includes_k else 1
        raw = round(factor * k * num_tokens / self.num_experts, 9)  # 1.1 * 100 / 10 -> 11, not 12
        rounded = {"ceil": math.ceil, "floor": math.floor, "round": round}[self.capacity_rounding]
        return max(int(rounded(raw)), self.min_capacity)
