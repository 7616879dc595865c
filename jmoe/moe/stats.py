"""The MoE layer's statistics: router losses and loads per chain step, then the layer totals
(coefficient-weighted auxiliary loss, active experts per token, realised expert FLOPs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.kernels import GATED
from jmoe.moe import losses
from jmoe.moe.config import MoEConfig
from jmoe.moe.routing import Routing

LOSS_KEYS = ("load_balance_loss", "z_loss", "entropy", "seq_balance_loss")


def mlp_weight_names(activation: str) -> tuple[str, ...]:
    """Input projections of one expert MLP: `("w_gate", "w_up")` for the gated activations
    ("swiglu", "clamped_swiglu"), else `("w_up",)`."""
    return ("w_gate", "w_up") if activation in GATED else ("w_up",)


def mlp_matrix_count(activation: str) -> int:
    """Weight matrices of one expert MLP: its input projections and the down projection."""
    return len(mlp_weight_names(activation)) + 1


def step_stats(
    config: MoEConfig,
    routed: Routing,
    kept_valid_TxK: jax.Array,
    *,
    seq_len: int,
    token_mask: jax.Array | None,
) -> dict[str, jax.Array]:
    """Losses and loads of one chain step's routing (before any capacity drop), its realised
    computations per token `active_T` and the fraction of valid slots the capacity dropped."""
    stats = {
        "z_loss": losses.router_z_loss(routed.logits, token_mask),
        "entropy": losses.routing_entropy(routed.probs, token_mask),
        "tokens_per_expert": losses.expert_counts(
            routed.expert_ids, routed.valid, config.num_experts, token_mask
        ),
        **config.router.balance_losses(
            routed,
            num_experts=config.num_experts,
            normalization=config.lb_normalization,
            seq_len=seq_len,
            token_mask=token_mask,
        ),
    }
    stats["active_T"] = kept_valid_TxK.sum(-1)
    routed_slots = losses.masked_mean(routed.valid.sum(-1).astype(jnp.float32), token_mask)
    kept_slots = losses.masked_mean(stats["active_T"].astype(jnp.float32), token_mask)
    dropped = 1.0 - kept_slots / jnp.maximum(routed_slots, 1e-9)
    stats["dropped_fraction"] = jnp.where(routed_slots > 0, dropped, 0.0)
    return stats


def layer_stats(
    config: MoEConfig, steps: list[dict[str, jax.Array]], token_mask: jax.Array | None
) -> dict[str, jax.Array]:
    """The layer's `stats` from its chain steps' `step_stats` (see `jmoe.MoE`)."""
    stats = {key: sum(s[key] for s in steps) for key in LOSS_KEYS}
    coefs = {
        "load_balance_loss": config.lb_coef,
        "z_loss": config.z_loss_coef,
        "seq_balance_loss": 0.0,
        "entropy": config.entropy_coef,
    }
    coefs.update(config.router.loss_coefs())  # router-owned coefficients (seq_balance_loss)
    stats["aux_loss"] = sum(coef * stats[key] for key, coef in coefs.items())
    loads = [s["tokens_per_expert"] for s in steps]
    stats["tokens_per_expert"] = loads[0] if len(loads) == 1 else jnp.stack(loads)
    stats["dropped_fraction"] = sum(s["dropped_fraction"] for s in steps) / len(steps)
    active_T = sum(s["active_T"] for s in steps)
    stats["active_experts"] = losses.masked_mean(active_T.astype(jnp.float32), token_mask)
    num_bins = config.slots * config.chain_steps + 1
    stats["active_experts_hist"] = jnp.stack(
        [
            losses.masked_mean((active_T == n).astype(jnp.float32), token_mask)
            for n in range(num_bins)
        ]
    )
    flops_per_hidden_unit = 2 * config.d_model * mlp_matrix_count(config.activation)
    stats["expert_flops_per_token"] = flops_per_hidden_unit * (
        config.d_ff * stats["active_experts"] + config.shared_width * config.chain_steps
    )
    return stats
