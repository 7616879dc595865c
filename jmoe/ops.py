"""Grouped matmuls with a backend choice: `implementation=None | "xla" | "ragged_dot"`.

- "xla": jmoe's tiled loop over the valid row tiles (`jmoe.tiled`); its cost follows the routed
  rows on every backend, and it is the always-working fallback.
- "ragged_dot": `jax.lax.ragged_dot`. Fast where XLA lowers it to a grouped kernel (TPU); on CPU
  (and reportedly recent NVIDIA GPUs) it computes every group densely, about E times the work.
- None: "ragged_dot" on TPU, "xla" elsewhere.

Rows of `x` are sorted by group; rows past `sum(group_sizes)` come out as zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe import tiled

IMPLEMENTATIONS = ("xla", "ragged_dot")
ACTIVATIONS = tiled.ACTIVATIONS


def resolve_implementation(implementation: str | None) -> str:
    """The implementation `implementation=None` stands for on the default backend."""
    if implementation is None:
        return "ragged_dot" if jax.default_backend() == "tpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {(None, *IMPLEMENTATIONS)}"
        )
    return implementation


def _ragged_dot(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    y = jax.lax.ragged_dot(
        x_MxK, w_GxKxN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return y.astype(x_MxK.dtype)


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
      implementation: None (fastest for the backend), "xla" or "ragged_dot".

    Returns:
      `[M, N]` in `x_MxK.dtype`; rows past `sum(group_sizes)` are zeros. Differentiable in `x`
      and `w`.

    Example:
      >>> x = jnp.ones((4, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
      >>> grouped_matmul(x, w, jnp.array([1, 2]))[:, 0].tolist()
      [1.0, 2.0, 2.0, 0.0]
    """
    if resolve_implementation(implementation) == "ragged_dot":
        return _ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
    return tiled.grouped_matmul(x_MxK, w_GxKxN, group_sizes_G)


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
      implementation: None, "xla" (the whole MLP per row tile) or "ragged_dot".

    Returns:
      `[M, D]`; rows past `sum(group_sizes)` are zeros and cost nothing with "xla".
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
    if len(w_in) != (2 if activation == "swiglu" else 1):
        raise ValueError(
            f"activation={activation!r} takes {2 if activation == 'swiglu' else 1} "
            f"input projections, got {len(w_in)}"
        )
    if resolve_implementation(implementation) == "ragged_dot":
        pre = [_ragged_dot(x_MxD, w, group_sizes_G) for w in w_in]
        return _ragged_dot(ACTIVATIONS[activation](*pre), w_down_GxFxD, group_sizes_G)
    return tiled.expert_mlp(x_MxD, tuple(w_in), w_down_GxFxD, group_sizes_G, activation)
