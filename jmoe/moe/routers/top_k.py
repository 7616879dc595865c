"""`TopK`: token-choice top-k routing with softmax or sigmoid scores, a selection-only bias
(auxiliary-loss-free balancing) and DeepSeek-V2/V3 group-limited selection."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp

from jmoe.kernels import GROUP_SCORES, check_groups
from jmoe.moe import gating, losses, routing
from jmoe.moe.routers.base import Router, register_router
from jmoe.validation import check, check_choice


@register_router
@dataclasses.dataclass(frozen=True)
class TopK(Router):
    """Token-choice top-k (Switch, Mixtral, Qwen, OLMoE, DeepSeek-V2/V3).

    Attributes:
      k: experts per token.
      score: "softmax" or "sigmoid" router scores.
      normalize: renormalise the k weights (only when k > 1 unless `renorm_when_k1`).
      renorm_when_k1: renormalise a single weight too (HF parity; cuts the router gradient).
      scale: routed scaling factor applied to the weights.
      n_groups, top_groups: group-limited selection (both or neither): only each token's
        `top_groups` best of `n_groups` equal expert groups are eligible.
      group_score: a group's score from its members' biased selection scores: "top2_sum" (the
        sum of the two best, DeepSeek-V3, whatever k) or "max" (the best, DeepSeek-V2).
      bias_update_rate: auxiliary-loss-free balancing rate of the selection bias
        (`moe_state/bias`; 0 leaves it fixed).
      seq_balance_coef: DeepSeek-V3 sequence-wise balance loss coefficient.
    """

    kind: typing.ClassVar[str] = "top_k"
    k: int = 2
    score: str = "softmax"
    normalize: bool = True
    renorm_when_k1: bool = False
    scale: float = 1.0
    n_groups: int | None = None
    top_groups: int | None = None
    group_score: str = "top2_sum"
    bias_update_rate: float = 0.0
    seq_balance_coef: float = 0.0

    def __post_init__(self):
        check("k", self.k, self.k >= 1, "an integer >= 1", self.owner)
        check_choice("score", self.score, routing.SCORES, self.owner)
        check_choice("group_score", self.group_score, tuple(GROUP_SCORES), self.owner)
        for name in ("bias_update_rate", "seq_balance_coef"):
            check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0", self.owner)

    def check_layer(self, num_experts: int, chain_steps: int) -> None:
        check("k", self.k, self.k <= num_experts, f"at most num_experts={num_experts}", self.owner)
        try:
            check_groups(num_experts, self.k, self.n_groups, self.top_groups, self.group_score)
        except ValueError as e:
            raise ValueError(f"{self.owner}: {e}") from None

    def slots(self, num_experts: int) -> int:
        return self.k

    def init_state(self, num_experts: int, chain_steps: int) -> dict[str, jax.Array]:
        shape = (num_experts,) if chain_steps == 1 else (chain_steps, num_experts)
        return {"bias": jnp.zeros(shape, jnp.float32)}

    def update_state(self, state: dict, stats: dict) -> dict:
        if self.bias_update_rate == 0:
            return state
        bias = losses.update_bias(state["bias"], stats["tokens_per_expert"], self.bias_update_rate)
        return {**state, "bias": bias}

    def _options(self, state: dict, step: int) -> dict:
        bias = state["bias"]
        return dict(
            score=self.score,
            normalize=self.normalize,
            scale=self.scale,
            bias=bias if bias.ndim == 1 else bias[step],
            n_groups=self.n_groups,
            top_groups=self.top_groups,
            group_score=self.group_score,
            renorm_when_k1=self.renorm_when_k1,
        )

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        return routing.top_k(logits_TxE, self.k, **self._options(state, step))

    def gate(self, x_TxD, w_DxE, state, *, step=0, deterministic=True, implementation=None):
        """One fused Pallas kernel for the router matmul and the top-k where `implementation`
        selects it (`jmoe.moe.gating`), else `route` on `x @ w`."""
        routed, _ = gating.top_k_gating(
            x_TxD, w_DxE, self.k, **self._options(state, step), implementation=implementation
        )
        return routed

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        terms = super().balance_losses(
            routed,
            num_experts=num_experts,
            normalization=normalization,
            seq_len=seq_len,
            token_mask=token_mask,
        )
        terms["seq_balance_loss"] = losses.sequence_balance(
            routed, num_experts=num_experts, seq_len=seq_len, token_mask=token_mask
        )
        return terms

    def loss_coefs(self) -> dict[str, float]:
        return {"seq_balance_loss": self.seq_balance_coef}
