"""The "pallas" implementation: the `pallas_kernels` grouped matmul, fused SwiGLU and fused gating.

The only jmoe module that imports `pallas_kernels`. The kernels run compiled on TPU (Mosaic) and
GPU (Triton), and in the Pallas interpreter on any other backend (slow; for tests). They take one
dtype: weights are cast to the rows' dtype (a no-op when they already match).
"""

from __future__ import annotations

import jax

import pallas_kernels
from jmoe.kernels.activations import Activation, activation_fn
from jmoe.kernels.group_bias import add_group_bias

COMPILED_BACKENDS = ("tpu", "gpu")


def interpret() -> bool:
    """Whether the kernels run in the Pallas interpreter: on every backend but TPU and GPU."""
    return jax.default_backend() not in COMPILED_BACKENDS


def supports(backend: str, shapes: tuple[tuple[int, int], ...], dtype) -> bool:
    """Whether the compiled kernels run on `backend` and take every `[*, k] x [k, n]` of `shapes`
    in `dtype` (the gating kernel takes every shape: it pads to its blocks itself)."""
    return pallas_kernels.available(backend) and all(
        pallas_kernels.supported(k, n, dtype, backend) for k, n in shapes
    )


def grouped_matmul(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """`pallas_kernels.gmm` with the weights in the rows' dtype."""
    w_GxKxN = w_GxKxN.astype(x_MxK.dtype)
    return pallas_kernels.gmm(x_MxK, w_GxKxN, group_sizes_G, interpret=interpret())


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    activation: Activation,
    b_in: tuple[jax.Array, ...] = (),
    b_down_GxD: jax.Array | None = None,
) -> jax.Array:
    """The fused SwiGLU kernel for unbiased "swiglu" gate and up (else one `gmm` per input
    projection, its bias and the activation), then a `gmm` for the down projection and its bias.
    """
    w_in = tuple(w.astype(x_MxD.dtype) for w in w_in)
    w_down_GxFxD = w_down_GxFxD.astype(x_MxD.dtype)
    if activation == "swiglu" and not b_in:
        h_MxF = pallas_kernels.swiglu(x_MxD, *w_in, group_sizes_G, interpret=interpret())
    else:
        b_in = b_in or (None,) * len(w_in)
        pre = [
            add_group_bias(grouped_matmul(x_MxD, w_GxDxF, group_sizes_G), b_GxF, group_sizes_G)
            for w_GxDxF, b_GxF in zip(w_in, b_in, strict=True)
        ]
        h_MxF = activation_fn(activation)(*pre)
    y_MxD = pallas_kernels.gmm(h_MxF, w_down_GxFxD, group_sizes_G, interpret=interpret())
    return add_group_bias(y_MxD, b_down_GxD, group_sizes_G)


def top_k_gating(x_TxD: jax.Array, w_DxE: jax.Array, k: int, **options):
    """The fused gating kernel: logits `x @ w` (float32), scores, bias and top-k in one kernel,
    compiled on TPU / GPU and interpreted elsewhere (`jmoe.kernels.pallas_top_k_gating`).

    Args:
      x_TxD: `[T, D]` router input.
      w_DxE: `[D, E]` router weights.
      k: experts per token.
      **options: `score`, `bias`, `normalize`, `scale`, `n_groups`, `top_groups`, `group_score`,
        `renorm_when_k1` (and block sizes), as in `pallas_kernels.top_k_gating`.

    Returns:
      `(ids_TxK, weights_TxK, counts_E, probs_TxE, logits_TxE)`: expert ids (ties to the lowest
      index), combine weights, slots per expert, scores and logits; differentiable in `x` and `w`.
    """
    return pallas_kernels.top_k_gating(x_TxD, w_DxE, k, interpret=interpret(), **options)
