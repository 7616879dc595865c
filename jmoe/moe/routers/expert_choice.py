"""`ExpertChoice`: experts pick their tokens (Zhou et al. 2022)."""

from __future__ import annotations

import dataclasses
import typing

import jax.numpy as jnp

from jmoe.moe import routing
from jmoe.moe.routers.base import Router, register_router
from jmoe.validation import check


@register_router
@dataclasses.dataclass(frozen=True)
class ExpertChoice(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` best tokens, so loads
    are balanced by construction (no load-balance loss). Not causal: a token's experts depend on
    the later tokens of the batch, so a causal LM would see the future; `allow_noncausal=True`
    acknowledges that.

    Attributes:
      capacity_factor: experts per token on average; an expert takes
        `round(capacity_factor * T / E)` tokens, in [1, T].
      eval_capacity_factor: the factor when `deterministic=True` (default: the same).
      allow_noncausal: must be True.
    """

    kind: typing.ClassVar[str] = "expert_choice"
    token_choice: typing.ClassVar[bool] = False
    capacity_factor: float = 2.0
    eval_capacity_factor: float | None = None
    allow_noncausal: bool = False

    def __post_init__(self):
        check(
            "allow_noncausal",
            self.allow_noncausal,
            self.allow_noncausal,
            "True to use expert choice, which is not causal: a token's experts depend on later "
            "tokens, so a causal LM would see the future",
            self.owner,
        )
        cf, eval_cf = self.capacity_factor, self.eval_capacity_factor
        check("capacity_factor", cf, cf > 0, "a number > 0", self.owner)
        check(
            "eval_capacity_factor",
            eval_cf,
            eval_cf is None or eval_cf > 0,
            "None or > 0",
            self.owner,
        )

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        """Tokens each expert takes: `round(cf * T / E)` in [1, T]."""
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return min(max(round(factor * num_tokens / num_experts), 1), num_tokens)

    def slots(self, num_experts: int) -> int:
        return num_experts

    def expected_active(self, num_experts: int, chain_steps: int) -> float:
        return float(self.capacity_factor * chain_steps)

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        t, e = logits_TxE.shape
        return routing.expert_choice(logits_TxE, self.capacity(t, e, deterministic))

    def max_rows(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return num_experts * self.capacity(num_tokens, num_experts, deterministic)

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        zero = jnp.zeros((), jnp.float32)
        return {"load_balance_loss": zero, "seq_balance_loss": zero}
