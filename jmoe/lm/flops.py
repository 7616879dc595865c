"""Training FLOPs of the language model (`flops_per_token`), for throughput and MFU reports."""

from __future__ import annotations

import numpy as np

from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import moe_layers
from jmoe.moe.stats import mlp_matrix_count


def flops_per_token(config: ModelConfig, seq_len: int, active_experts=None) -> float:
    """Training FLOPs per token: `6 x matmul weights used per token + 12 x L x H x A x S`.

    The weight term counts the attention projections, dense FFNs, routers, the routed experts
    actually computed, shared experts and the output projection (the embedding lookup is not a
    matmul); the attention term is the PaLM count of the score and value matmuls over all S
    positions (the causal mask is not subtracted). With `config.mla` the projections are MLA's
    and A is the mean of its query/key and value head widths (the expanded training form).

    Args:
      config: the model config.
      seq_len: S.
      active_experts: realised expert computations per token, a number or one per MoE layer
        (`stats["active_experts"]`); default `config.moe.expected_active_experts` (the budget
        target, else the router's slots per token times the chain steps).
    """
    moe, d = config.moe, config.d_model
    h, g, a = config.n_heads, config.kv_heads, config.dim_per_head
    n_moe = len(moe_layers(config))
    if active_experts is None:
        active_experts = moe.expected_active_experts
    active_L = np.broadcast_to(np.asarray(active_experts, np.float64), (n_moe,))
    attention_weights = d * a * (2 * h + 2 * g)
    if config.mla is not None:
        attention_weights = config.mla.weights(d, h)
        a = (config.mla.qk_head_dim + config.mla.v_head_dim) / 2
    matrices = mlp_matrix_count(moe.activation)
    shared = moe.chain_steps * d * (matrices * moe.shared_width + int(moe.shared_gate))
    moe_weights = n_moe * (moe.chain_steps * d * moe.num_router_outputs + shared)
    moe_weights += matrices * d * moe.d_ff * float(active_L.sum())
    weights = (
        config.n_layers * attention_weights
        + (config.n_layers - n_moe) * 3 * d * config.d_ff
        + moe_weights
        + d * config.vocab_size
    )
    return 6.0 * weights + 12.0 * config.n_layers * h * a * seq_len
