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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.kernels import registry
from jmoe.kernels.activations import ACTIVATIONS


def grouped_matmul(
    x_MxK: jax.Array,
    w_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Grouped matmul `y[r] = x[r] @ w[group(r)]` over rows sorted by group.

    Args:
      x_MxK: `[M, K]` rows sorted by group.
      w_GxKxN: `[G, K, N]` one weight matrix per group.
      group_sizes_G: `[G]` int32 rows per group, `sum <= M`.
      implementation: None (fastest for the backend), "xla", "ragged_dot" or "pallas".

    Returns:
      `[M, N]` in `x_MxK.dtype`; rows past `sum(group_sizes)` are zeros. Differentiable in `x`
      and `w`.

    Examples:
      >>> x = jnp.ones((4, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
      >>> grouped_matmul(x, w, jnp.array([1, 2]))[:, 0].tolist()
      [1.0, 2.0, 2.0, 0.0]
    """
    x_MxK, w_GxKxN = jnp.asarray(x_MxK), jnp.asarray(w_GxKxN)
    _, k, n = w_GxKxN.shape
    impl = registry.resolve("grouped_matmul", implementation, shapes=((k, n),), dtype=x_MxK.dtype)
    return impl.grouped_matmul(x_MxK, w_GxKxN, group_sizes_G)


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    *,
    activation: str = "swiglu",
    implementation: str | None = None,
) -> jax.Array:
    """Each row's expert MLP: `act(x @ w_in[g] ...) @ w_down[g]` for rows sorted by expert `g`.

    Args:
      x_MxD: `[M, D]` rows sorted by expert.
      w_in: `(w_gate, w_up)` for "swiglu", `(w_up,)` for "gelu" / "relu"; each `[G, D, F]`.
      w_down_GxFxD: `[G, F, D]` down projections.
      group_sizes_G: `[G]` int32 rows per expert.
      activation: "swiglu", "gelu" or "relu".
      implementation: None, "xla" (the whole MLP per row tile), "ragged_dot" or "pallas" (the
        fused SwiGLU kernel for gate and up, then a grouped matmul for the down projection).

    Returns:
      `[M, D]`; rows past `sum(group_sizes)` are zeros and cost nothing with "xla".
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
    num_in = 2 if activation == "swiglu" else 1
    if len(w_in) != num_in:
        raise ValueError(
            f"activation={activation!r} takes {num_in} input projections, got {len(w_in)}"
        )
    x_MxD, w_down_GxFxD = jnp.asarray(x_MxD), jnp.asarray(w_down_GxFxD)
    w_in = tuple(map(jnp.asarray, w_in))
    _, d, f = w_in[0].shape
    # both the input projections `[*, D] x [D, F]` and the down projection `[*, F] x [F, D]`
    impl = registry.resolve(
        "expert_mlp", implementation, shapes=((d, f), (f, d)), dtype=x_MxD.dtype
    )
    return impl.expert_mlp(x_MxD, w_in, w_down_GxFxD, group_sizes_G, activation)


def gating_implementation(implementation: str | None) -> str:
    """Where the router matmul and top-k run: "pallas" (one fused kernel: `pallas_top_k_gating`)
    or "xla" (plain XLA ops on the caller's side).

    Args:
      implementation: None ("pallas" on the backends of `PALLAS_DEFAULT_BACKENDS` where the
        kernels compile, else "xla"), "pallas", or "xla" / "ragged_dot" (both "xla").
    """
    return registry.resolve("gating", implementation).name
