"""Compute backends of the MoE layer: the grouped matmul, the expert MLP and the fused gating,
each with XLA, `jax.lax.ragged_dot` and Pallas implementations chosen in one registry
(`jmoe.kernels.registry`)."""

from jmoe.kernels.activations import ACTIVATIONS, GATED, ClampedSwiGLU, activation_fn
from jmoe.kernels.api import expert_mlp, gating_implementation, grouped_matmul
from jmoe.kernels.pallas import top_k_gating as pallas_top_k_gating
from jmoe.kernels.registry import IMPLEMENTATIONS, PALLAS_DEFAULT_BACKENDS
from pallas_kernels.common import (  # the group-limited selection rule, kernel and XLA
    GROUP_SCORES,
    check_groups,
)

__all__ = [
    "ACTIVATIONS",
    "GATED",
    "GROUP_SCORES",
    "ClampedSwiGLU",
    "activation_fn",
    "IMPLEMENTATIONS",
    "PALLAS_DEFAULT_BACKENDS",
    "check_groups",
    "expert_mlp",
    "gating_implementation",
    "grouped_matmul",
    "pallas_top_k_gating",
]
