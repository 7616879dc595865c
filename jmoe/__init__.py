"""jmoe: JAX-native Mixture-of-Experts.

Axis letters used in names (`x_TxD`) and einsum strings: B batch, S sequence, T tokens, D model
width, F expert hidden width, E experts, K slots per token, C capacity or chain steps, G groups,
V vocab, M sorted rows (T * K), P tile-padded rows, N tiles.

Packages: `jmoe.moe` (the MoE layer, stage by stage), `jmoe.kernels` (grouped matmul backends
and their registry),
`jmoe.lm` (the language model), `jmoe.train` (configs, data, trainer, checkpoints), and
`jmoe.sharding` (device meshes, expert parallelism's layout, multi-host setup).
"""

from jmoe import kernels, sharding
from jmoe.kernels import grouped_matmul
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.lm.upcycle import grow_model_experts, map_moe_layers, upcycle_model
from jmoe.moe import dispatch, losses, routers, routing
from jmoe.moe.config import MoEConfig
from jmoe.moe.layer import Experts, Gate, MoE, SharedMLP, update_state, with_null_experts
from jmoe.moe.losses import update_bias, update_budget
from jmoe.moe.routers import (
    ExpertChoice,
    NullExperts,
    Router,
    TopK,
    TopP,
    register_router,
)
from jmoe.moe.routing import Routing
from jmoe.moe.upcycle import grow_experts, upcycle_layer
from jmoe.sharding import MeshConfig

__all__ = [
    "ExpertChoice",
    "Experts",
    "Gate",
    "MeshConfig",
    "ModelConfig",
    "MoE",
    "MoEConfig",
    "NullExperts",
    "Router",
    "Routing",
    "SharedMLP",
    "TopK",
    "TopP",
    "Transformer",
    "dispatch",
    "grouped_matmul",
    "grow_experts",
    "grow_model_experts",
    "kernels",
    "losses",
    "map_moe_layers",
    "register_router",
    "routers",
    "routing",
    "sharding",
    "update_bias",
    "update_budget",
    "update_state",
    "upcycle_layer",
    "upcycle_model",
    "with_null_experts",
]
