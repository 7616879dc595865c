"""Routers whose compute a budget controller can hold at a target: `NullExperts` (AdaMoE) and
`TopP` (dynamic top-p)."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp

from jmoe.moe import losses, routing
from jmoe.moe.routers.base import Router, register_router
from jmoe.validation import check, check_choice


@dataclasses.dataclass(frozen=True)
class BudgetedRouter(Router):
    """A router with a compute budget: a controller in `moe_state/budget` holds the mean active
    experts per token (over all chain steps) at `target_active_experts`, while each token's count
    still varies. The budget is a pressure toward fewer experts; each subclass says how it
    applies it.

    Attributes:
      target_active_experts: the mean to hold (None: no controller).
      budget_rate: step size of the controller.
    """

    target_active_experts: float | None = dataclasses.field(default=None, kw_only=True)
    budget_rate: float = dataclasses.field(default=0.01, kw_only=True)

    def __post_init__(self):
        check("budget_rate", self.budget_rate, self.budget_rate >= 0, "a number >= 0", self.owner)

    def check_layer(self, num_experts: int, chain_steps: int) -> None:
        if self.target_active_experts is None:
            return
        most = self.slots(num_experts) * chain_steps
        check(
            "target_active_experts",
            self.target_active_experts,
            0 < self.target_active_experts <= most,
            f"None or in (0, {most}] (slots x chain_steps)",
            self.owner,
        )

    def expected_active(self, num_experts: int, chain_steps: int) -> float:
        if self.target_active_experts is None:
            return super().expected_active(num_experts, chain_steps)
        return float(self.target_active_experts)

    def init_state(self, num_experts: int, chain_steps: int) -> dict[str, jax.Array]:
        if self.target_active_experts is None:
            return {}
        return {"budget": jnp.zeros((), jnp.float32)}

    def update_state(self, state: dict, stats: dict) -> dict:
        if self.target_active_experts is None:
            return state
        budget = losses.update_budget(
            state["budget"], stats["active_experts"], self.target_active_experts, self.budget_rate
        )
        return {**state, "budget": budget}

    def pressure(self, state: dict) -> jax.Array | float:
        """The controller's current pressure toward fewer experts (0 without a budget)."""
        return state.get("budget", 0.0)


@register_router
@dataclasses.dataclass(frozen=True)
class NullExperts(BudgetedRouter):
    """AdaMoE: `num_null` null experts beside the true ones; a slot that picks a null expert
    costs nothing, so a token may use fewer true experts. The budget raises the null logits.

    Attributes:
      num_null: null experts M >= 1 (router outputs are `E + M`).
      k: slots per token, counting true and null picks.
      null_balance: load balance of null experts, "grouped" (the paper) or "individual".
    """

    kind: typing.ClassVar[str] = "null_experts"
    num_null: int
    k: int = 2
    null_balance: str = "grouped"

    def __post_init__(self):
        super().__post_init__()
        check("num_null", self.num_null, self.num_null >= 1, "an integer >= 1", self.owner)
        check("k", self.k, self.k >= 1, "an integer >= 1", self.owner)
        check_choice("null_balance", self.null_balance, losses.NULL_BALANCES, self.owner)

    def check_layer(self, num_experts: int, chain_steps: int) -> None:
        total = num_experts + self.num_null
        check("k", self.k, self.k <= total, f"at most num_experts + num_null={total}", self.owner)
        super().check_layer(num_experts, chain_steps)

    def num_outputs(self, num_experts: int) -> int:
        return num_experts + self.num_null

    def slots(self, num_experts: int) -> int:
        return self.k

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        return routing.null_experts(
            logits_TxE, self.k, num_null=self.num_null, null_offset=self.pressure(state)
        )

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        lb = losses.load_balance(
            routed,
            num_experts=num_experts,
            normalization=normalization,
            num_null=self.num_null,
            null_balance=self.null_balance,
            token_mask=token_mask,
        )
        return {"load_balance_loss": lb, "seq_balance_loss": jnp.zeros((), jnp.float32)}


@register_router
@dataclasses.dataclass(frozen=True)
class TopP(BudgetedRouter):
    """Dynamic top-p ("Harder Tasks Need More Experts"): each token takes experts in descending
    probability until their cumulative probability passes `p`. The budget lowers `p`.

    Attributes:
      p: threshold in (0, 1].
      max_k: optional cap on experts per token (default: all experts).
      boundary: "strict" (cumulative > p, the paper's code) or "inclusive" (>= p).
    """

    kind: typing.ClassVar[str] = "top_p"
    p: float = 0.4
    max_k: int | None = None
    boundary: str = "strict"

    def __post_init__(self):
        super().__post_init__()
        check("p", self.p, 0 < self.p <= 1, "in (0, 1]", self.owner)
        check(
            "max_k", self.max_k, self.max_k is None or self.max_k >= 1, "None or >= 1", self.owner
        )
        check_choice("boundary", self.boundary, routing.TOP_P_BOUNDARIES, self.owner)

    def check_layer(self, num_experts: int, chain_steps: int) -> None:
        check(
            "max_k",
            self.max_k,
            self.max_k is None or self.max_k <= num_experts,
            f"None or in [1, num_experts={num_experts}]",
            self.owner,
        )
        super().check_layer(num_experts, chain_steps)

    def slots(self, num_experts: int) -> int:
        return self.max_k or num_experts

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        p = self.p
        if "budget" in state:
            p = jnp.clip(self.p - self.pressure(state), 1e-6, 1.0)
        return routing.top_p(logits_TxE, p, max_k=self.max_k, boundary=self.boundary)
