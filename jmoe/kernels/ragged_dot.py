"""The "ragged_dot" implementation: `jax.lax.ragged_dot` for each grouped matmul.

Fast where XLA lowers it to a grouped kernel (TPU). On CPU (and reportedly on recent NVIDIA GPUs)
it computes every group densely, about E times the work, so the registry's fallback order tries it
on TPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.kernels.activations import ACTIVATIONS


def grouped_matmul(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """`y[r] = x[r] @ w[group(r)]`, float32 accumulation, in `x_MxK.dtype`."""
    y_MxN = jax.lax.ragged_dot(
        x_MxK, w_GxKxN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return y_MxN.astype(x_MxK.dtype)


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    activation: str,
) -> jax.Array:
    """Three (or two) grouped matmuls: the input projections, the activation, the down one."""
    pre = [grouped_matmul(x_MxD, w_GxDxF, group_sizes_G) for w_GxDxF in w_in]
    return grouped_matmul(ACTIVATIONS[activation](*pre), w_down_GxFxD, group_sizes_G)
