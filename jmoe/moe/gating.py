"""Top-k gating: the router matmul and `routing.top_k`, fused into one Pallas kernel where the
registry picks "pallas" (`jmoe.kernels.gating_implementation`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe import kernels
from jmoe.moe import routing


def top_k_gating(
    x_TxD: jax.Array,
    w_DxE: jax.Array,
    k: int,
    *,
    implementation: str | None = None,
    **options,
) -> tuple[routing.Routing, jax.Array]:
    """Router logits `x @ w` (float32, highest precision) and top-k routing, fused with "pallas".

    Args:
      x_TxD: `[T, D]` router input.
      w_DxE: `[D, E]` router weights.
      k: experts per token.
      implementation: "pallas" (one fused kernel), "xla" / "ragged_dot" (`routing.top_k` on
        `x @ w`), or None ("pallas" on the `PALLAS_DEFAULT_BACKENDS`, else "xla").
      **options: `score`, `bias`, `normalize`, `scale`, `n_groups`, `top_groups`, `group_score`,
        `renorm_when_k1`, as in `routing.top_k` (`bias` `[E]` shifts the scores for selection
        only).

    Returns:
      `(routing, counts)`: a `Routing` equal to `routing.top_k(logits, k, ...)` (ids exactly,
      ties to the lowest index) and `counts` `[E]` int32 slots per expert.

    Example:
      >>> r, counts = top_k_gating(jnp.eye(2), jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), 1)
      >>> r.expert_ids.tolist(), counts.tolist()
      ([[0], [2]], [1, 0, 1])
    """
    if kernels.gating_implementation(implementation) == "pallas":
        ids, weights, counts, probs, logits = kernels.pallas_top_k_gating(
            x_TxD, w_DxE, k, **options
        )
        return routing.Routing(ids, weights, jnp.ones(ids.shape, bool), probs, logits), counts
    logits = jnp.dot(
        x_TxD.astype(jnp.float32), w_DxE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    r = routing.top_k(logits, k, **options)
    counts = jnp.zeros(w_DxE.shape[-1], jnp.int32).at[r.expert_ids.reshape(-1)].add(1)
    return r, counts
