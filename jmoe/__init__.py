"""jmoe: JAX-native Mixture-of-Experts.

Axis letters used in names (`x_TxD`) and einsum strings: B batch, S sequence, T tokens, D model
width, F expert hidden width, E experts, K slots per token, C capacity or chain steps, G groups,
V vocab, M sorted rows (T * K), P tile-padded rows, N tiles.
"""

from jmoe import kernels as ops
from jmoe import sharding
from jmoe.kernels import grouped_matmul
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe import dispatch, losses, routing
from jmoe.moe.config import MoEConfig
from jmoe.moe.layer import Experts, MoE, Router, SharedMLP, update_state, with_null_experts
from jmoe.moe.losses import update_bias, update_budget
from jmoe.moe.routing import Routing
from jmoe.sharding import MeshConfig

__all__ = [
    "Experts",
    "MeshConfig",
    "ModelConfig",
    "MoE",
    "MoEConfig",
    "Router",
    "Routing",
    "SharedMLP",
    "Transformer",
    "dispatch",
    "grouped_matmul",
    "losses",
    "ops",
    "routing",
    "sharding",
    "update_bias",
    "update_budget",
    "update_state",
    "with_null_experts",
]
