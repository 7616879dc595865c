"""The "ragged_dot" implementation: `jax.lax.ragged_dot` for each grouped matmul.

Fast where XLA lowers it to a grouped kernel (TPU). On CPU (and reportedly on recent NVIDIA GPUs)
it computes every group densely, about E times the work, so the registry's fallback order tries it
on TPU only. Quantized weights (`jmoe.kernels.quantization`) go into `ragged_dot` as stored, and
their column scales multiply each row's output by its group's scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.kernels.activations import Activation, activation_fn
from jmoe.kernels.group_bias import add_group_bias, scale_group_columns


def grouped_matmul(
    x_MxK: jax.Array,
    w_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    scale_GxN: jax.Array | None = None,
) -> jax.Array:
    """`y[r] = x[r] @ w[group(r)] (* scale[group(r)])`, float32 accumulation, in `x_MxK.dtype`."""
    y_MxN = jax.lax.ragged_dot(
        x_MxK, w_GxKxN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return scale_group_columns(y_MxN, scale_GxN, group_sizes_G).astype(x_MxK.dtype)


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    activation: Activation,
    b_in: tuple[jax.Array, ...] = (),
    b_down_GxD: jax.Array | None = None,
    scales_in: tuple[jax.Array, ...] = (),
    scale_down_GxD: jax.Array | None = None,
) -> jax.Array:
    """Three (or two) grouped matmuls: the input projections, the activation, the down one;
    each scale and bias (if any) is applied to its matmul's rows by their group."""
    b_in = b_in or (None,) * len(w_in)
    scales_in = scales_in or (None,) * len(w_in)
    pre = [
        add_group_bias(grouped_matmul(x_MxD, w_GxDxF, group_sizes_G, s_GxF), b_GxF, group_sizes_G)
        for w_GxDxF, s_GxF, b_GxF in zip(w_in, scales_in, b_in, strict=True)
    ]
    h_MxF = activation_fn(activation)(*pre)
    y_MxD = grouped_matmul(h_MxF, w_down_GxFxD, group_sizes_G, scale_down_GxD)
    return add_group_bias(y_MxD, b_down_GxD, group_sizes_G)
