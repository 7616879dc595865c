"""Grouped matmuls with a backend choice: `implementation=None | "xla" | "ragged_dot" | "pallas"`.

- "xla": the tiled loop over the valid row tiles (`jmoe.kernels.xla_tiled`); its cost follows the
  routed rows on every backend, and it is the always-working fallback.
- "ragged_dot": `jax.lax.ragged_dot` (`jmoe.kernels.ragged_dot`). Fast where XLA lowers it to a
  grouped kernel (TPU); on CPU (and reportedly recent NVIDIA GPUs) it computes every group densely,
  about E times the work.
- "pallas": the `pallas_kernels` grouped matmul (TPU Mosaic / GPU Triton) and, for SwiGLU experts,
  the fused gate-and-up kernel (`jmoe.kernels.pallas`). Forced on a CPU it runs in the Pallas
  interpreter (slow; tests).
- None: the first of the backend's fallback order that supports the shapes and dtype
  (`jmoe.kernels.registry`): "pallas" on the backends of `PALLAS_DEFAULT_BACKENDS` (none until
  the compiled kernels are verified on that hardware), then "ragged_dot" on TPU, then "xla".

Rows of `x` are sorted by group; rows past `sum(group_sizes)` come out as zeros.

Weights may be quantized (int8 or float8 e4m3 with float32 column scales,
`jmoe.kernels.quantization`): "xla" converts one group's weight at a time to the rows' dtype and
"ragged_dot" takes them as stored; either multiplies each product's columns by the group's
scales. "pallas" does not take them (None never picks it; forced, the XLA twin runs). Quantized
weights are for inference: their grouped matmuls have no backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.kernels import registry
from jmoe.kernels.activations import ClampedSwiGLU, activation_fn, is_gated
from jmoe.kernels.group_bias import add_group_bias
from jmoe.kernels.quantization import is_quantized


def grouped_matmul(
    x_MxK: jax.Array,
    w_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    bias_GxN: jax.Array | None = None,
    scale_GxN: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Grouped matmul `y[r] = x[r] @ w[group(r)] (+ bias[group(r)])` over rows sorted by group.

    Args:
      x_MxK: `[M, K]` rows sorted by group.
      w_GxKxN: `[G, K, N]` one weight matrix per group (float, or quantized with `scale_GxN`).
      group_sizes_G: `[G]` int32 rows per group, `sum <= M`.
      bias_GxN: optional `[G, N]` bias per group, added after the matmul.
      scale_GxN: the `[G, N]` float32 column scales of a quantized `w` (`w ~= q * scale`), which
        the matmul applies as `(x @ q) * scale`; required with an int8 / fp8 `w`.
      implementation: None (fastest for the backend), "xla", "ragged_dot" or "pallas".

    Returns:
      `[M, N]` in `x_MxK.dtype`; rows past `sum(group_sizes)` are zeros (no bias). Differentiable
      in `x`, `w` and `bias` when `w` is not quantized.

    Examples:
      >>> x = jnp.ones((4, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
      >>> grouped_matmul(x, w, jnp.array([1, 2]))[:, 0].tolist()
      [1.0, 2.0, 2.0, 0.0]
    """
    x_MxK, w_GxKxN = jnp.asarray(x_MxK), jnp.asarray(w_GxKxN)
    g, k, n = w_GxKxN.shape
    scales = _check_scales(((w_GxKxN, scale_GxN),), ((g, n),))
    impl = registry.resolve(
        "grouped_matmul",
        implementation,
        shapes=((k, n),),
        dtype=x_MxK.dtype,
        quantized=bool(scales),
    )
    return add_group_bias(
        impl.grouped_matmul(x_MxK, w_GxKxN, group_sizes_G, *scales), bias_GxN, group_sizes_G
    )


def _check_scales(pairs, shapes) -> tuple:
    """`()` for float weights, or the scales of quantized ones (all of them or none).

    Raises:
      ValueError: a quantized weight without its scale, scales for some weights only, or a
        scale not shaped `[G, N]`.
    """
    given = [s is not None for _, s in pairs]
    for (w, s), shape in zip(pairs, shapes, strict=True):
        if s is None and is_quantized(w):
            raise ValueError(
                f"a {w.dtype} expert weight needs its column scales (`w ~= q * scale`): pass the "
                "scales of every quantized weight (jmoe.kernels.quantization.quantize)"
            )
        if s is not None and tuple(s.shape) != shape:
            raise ValueError(f"a weight's scales have shape {tuple(s.shape)}, need {shape}")
    if not any(given):
        return ()
    if not all(given):
        raise ValueError("scales are given for some weights only: quantize all or none")
    return tuple(jnp.asarray(s, jnp.float32) for _, s in pairs)


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    *,
    activation: str = "swiglu",
    b_in: tuple[jax.Array, ...] | None = None,
    b_down_GxD: jax.Array | None = None,
    scales_in: tuple[jax.Array, ...] | None = None,
    scale_down_GxD: jax.Array | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    implementation: str | None = None,
) -> jax.Array:
    """Each row's expert MLP: `act(x @ w_in[g] + b_in[g] ...) @ w_down[g] + b_down[g]` for rows
    sorted by expert `g`.

    Args:
      x_MxD: `[M, D]` rows sorted by expert.
      w_in: `(w_gate, w_up)` for the gated units ("swiglu", "clamped_swiglu"), `(w_up,)` for
        "gelu" / "relu"; each `[G, D, F]`.
      w_down_GxFxD: `[G, F, D]` down projections.
      group_sizes_G: `[G]` int32 rows per expert.
      activation: "swiglu", "clamped_swiglu" (GPT-OSS, with `swiglu_alpha` / `swiglu_limit`),
        "gelu" or "relu".
      b_in: optional biases of the input projections, one `[G, F]` per `w_in` entry (same order).
      b_down_GxD: optional `[G, D]` bias of the down projection.
      scales_in, scale_down_GxD: the column scales of quantized weights (int8 / fp8,
        `jmoe.kernels.quantization`): one `[G, F]` per `w_in` entry and `[G, D]`; all or none.
        Forward only.
      swiglu_alpha, swiglu_limit: the "clamped_swiglu" constants (`ClampedSwiGLU`).
      implementation: None, "xla" (the whole MLP per row tile), "ragged_dot" or "pallas" (the
        fused SwiGLU kernel for unbiased "swiglu" gate and up, else grouped matmuls).

    Returns:
      `[M, D]`; rows past `sum(group_sizes)` are zeros (no bias reaches them) and cost nothing
      with "xla".
    """
    act = activation_fn(activation, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    num_in = 2 if is_gated(activation) else 1
    if len(w_in) != num_in:
        raise ValueError(
            f"activation={activation!r} takes {num_in} input projections, got {len(w_in)}"
        )
    if b_in is not None and len(b_in) != num_in:
        raise ValueError(f"b_in has {len(b_in)} biases for the {num_in} input projections")
    if scales_in is not None and len(scales_in) != num_in:
        raise ValueError(
            f"scales_in has {len(scales_in)} scales for the {num_in} input projections"
        )
    x_MxD, w_down_GxFxD = jnp.asarray(x_MxD), jnp.asarray(w_down_GxFxD)
    w_in = tuple(map(jnp.asarray, w_in))
    g, d, f = w_in[0].shape
    scales = _check_scales(
        (*zip(w_in, scales_in or (None,) * num_in, strict=True), (w_down_GxFxD, scale_down_GxD)),
        ((g, f),) * num_in + ((g, d),),
    )
    # both the input projections `[*, D] x [D, F]` and the down projection `[*, F] x [F, D]`
    impl = registry.resolve(
        "expert_mlp",
        implementation,
        shapes=((d, f), (f, d)),
        dtype=x_MxD.dtype,
        quantized=bool(scales),
    )
    # The implementations take a name, or the `ClampedSwiGLU` carrying its constants.
    static_act = act if isinstance(act, ClampedSwiGLU) else activation
    b_in = () if b_in is None else tuple(map(jnp.asarray, b_in))
    b_down_GxD = None if b_down_GxD is None else jnp.asarray(b_down_GxD)
    quant = (scales[:-1], scales[-1]) if scales else ()
    return impl.expert_mlp(
        x_MxD, w_in, w_down_GxFxD, group_sizes_G, static_act, b_in, b_down_GxD, *quant
    )


def gating_implementation(implementation: str | None) -> str:
    """Where the router matmul and top-k run: "pallas" (one fused kernel: `pallas_top_k_gating`)
    or "xla" (plain XLA ops on the caller's side).

    Args:
      implementation: None ("pallas" on the backends of `PALLAS_DEFAULT_BACKENDS` where the
        kernels compile, else "xla"), "pallas", or "xla" / "ragged_dot" (both "xla").
    """
    return registry.resolve("gating", implementation).name
