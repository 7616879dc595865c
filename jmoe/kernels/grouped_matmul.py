"""Grouped matmuls with a backend choice: `implementation=None | "xla" | "ragged_dot" | "pallas"`.

- "xla": jmoe's tiled loop over the valid row tiles (`jmoe.tiled`); its cost follows the routed
  rows on every backend, and it is the always-working fallback.
- "ragged_dot": `jax.lax.ragged_dot`. Fast where XLA lowers it to a grouped kernel (TPU); on CPU
  (and reportedly recent NVIDIA GPUs) it computes every group densely, about E times the work.
- "pallas": the `pallas_kernels` grouped matmul (TPU Mosaic / GPU Triton) and, for SwiGLU experts,
  the fused gate-and-up kernel. Forced on a CPU it runs in the Pallas interpreter (slow; tests).
- None: "pallas" on the backends of `PALLAS_DEFAULT_BACKENDS` (none until the compiled kernels
  are verified on that hardware) when the kernels support the shapes and dtype, else
  "ragged_dot" on TPU and "xla" elsewhere (always "xla" on CPU).

Rows of `x` are sorted by group; rows past `sum(group_sizes)` come out as zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from jmoe.kernels import xla_tiled as tiled
from jmoe.moe import routing

IMPLEMENTATIONS = ("xla", "ragged_dot", "pallas")
ACTIVATIONS = tiled.ACTIVATIONS
_ACCELERATORS = ("tpu", "gpu")
# Backends where `implementation=None` picks the Pallas kernels: those whose compiled kernel
# tests (`tests/kernels/test_compiled.py`) have passed on the real hardware. None has yet, so
# "pallas" is opt-in everywhere; add "tpu" / "gpu" here once they do.
PALLAS_DEFAULT_BACKENDS: tuple[str, ...] = ()


def resolve_implementation(
    implementation: str | None, *, k: int | None = None, n: int | None = None, dtype=None
) -> str:
    """The implementation `implementation=None` stands for on the default backend.

    Args:
      implementation: None or one of `IMPLEMENTATIONS` (returned as is).
      k, n, dtype: the matmul's contracted and output widths and dtype; "pallas" is picked only
        on a backend of `PALLAS_DEFAULT_BACKENDS`, when they are given and the kernels support
        them.
    """
    if implementation is None:
        backend = jax.default_backend()
        known = None not in (k, n, dtype)
        default = backend in PALLAS_DEFAULT_BACKENDS and known
        if default and pallas_kernels.supported(k, n, dtype, backend):
            return "pallas"
        return "ragged_dot" if backend == "tpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {(None, *IMPLEMENTATIONS)}"
        )
    return implementation


def _interpret() -> bool:
    """Pallas kernels run compiled on TPU / GPU and in the interpreter elsewhere."""
    return jax.default_backend() not in _ACCELERATORS


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
      implementation: None (fastest for the backend), "xla", "ragged_dot" or "pallas".

    Returns:
      `[M, N]` in `x_MxK.dtype`; rows past `sum(group_sizes)` are zeros. Differentiable in `x`
      and `w`.

    Example:
      >>> x = jnp.ones((4, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
      >>> grouped_matmul(x, w, jnp.array([1, 2]))[:, 0].tolist()
      [1.0, 2.0, 2.0, 0.0]
    """
    x_MxK, w_GxKxN = jnp.asarray(x_MxK), jnp.asarray(w_GxKxN)
    _, k, n = w_GxKxN.shape
    impl = resolve_implementation(implementation, k=k, n=n, dtype=x_MxK.dtype)
    if impl == "ragged_dot":
        return _ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
    if impl == "pallas":  # the kernels take one dtype (a no-op when they already match)
        w_GxKxN = w_GxKxN.astype(x_MxK.dtype)
        return pallas_kernels.gmm(x_MxK, w_GxKxN, group_sizes_G, interpret=_interpret())
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
      implementation: None, "xla" (the whole MLP per row tile), "ragged_dot" or "pallas" (the
        fused SwiGLU kernel for gate and up, then a grouped matmul for the down projection).

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
    x_MxD, w_down_GxFxD = jnp.asarray(x_MxD), jnp.asarray(w_down_GxFxD)
    w_in = tuple(map(jnp.asarray, w_in))
    _, d, f = w_in[0].shape
    impl = resolve_implementation(implementation, k=d, n=f, dtype=x_MxD.dtype)
    if impl == "pallas" and implementation is None:
        impl = resolve_implementation(None, k=f, n=d, dtype=x_MxD.dtype)  # the down projection
    if impl == "ragged_dot":
        pre = [_ragged_dot(x_MxD, w, group_sizes_G) for w in w_in]
        return _ragged_dot(ACTIVATIONS[activation](*pre), w_down_GxFxD, group_sizes_G)
    if impl == "pallas":
        w_in = tuple(w.astype(x_MxD.dtype) for w in w_in)
        w_down_GxFxD = w_down_GxFxD.astype(x_MxD.dtype)
        kw = dict(interpret=_interpret())
        if activation == "swiglu":
            h = pallas_kernels.swiglu(x_MxD, *w_in, group_sizes_G, **kw)
        else:
            h = ACTIVATIONS[activation](pallas_kernels.gmm(x_MxD, w_in[0], group_sizes_G, **kw))
        return pallas_kernels.gmm(h, w_down_GxFxD, group_sizes_G, **kw)
    return tiled.expert_mlp(x_MxD, tuple(w_in), w_down_GxFxD, group_sizes_G, activation)


def top_k_gating(
    x_TxD: jax.Array,
    w_DxE: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    bias: jax.Array | None = None,
    normalize: bool = False,
    scale: float = 1.0,
    n_groups: int | None = None,
    top_groups: int | None = None,
    renorm_when_k1: bool = False,
    implementation: str | None = None,
) -> tuple[routing.Routing, jax.Array]:
    """Router logits `x @ w` (float32, highest precision) and top-k routing, fused with "pallas".

    Args:
      x_TxD: `[T, D]` router input.
      w_DxE: `[D, E]` router weights.
      k, score, bias, normalize, scale, n_groups, top_groups, renorm_when_k1: as in
        `jmoe.routing.top_k` (`bias` `[E]` shifts the scores for selection only).
      implementation: "pallas" (one fused kernel), "xla" / "ragged_dot" (`routing.top_k` on
        `x @ w`), or None ("pallas" on the `PALLAS_DEFAULT_BACKENDS`, else "xla").

    Returns:
      `(routing, counts)`: a `Routing` equal to `routing.top_k(logits, k, ...)` (ids exactly,
      ties to the lowest index) and `counts` `[E]` int32 slots per expert.

    Example:
      >>> r, counts = top_k_gating(jnp.eye(2), jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), 1)
      >>> r.expert_ids.tolist(), counts.tolist()
      ([[0], [2]], [1, 0, 1])
    """
    e = w_DxE.shape[-1]
    impl = implementation
    if impl is None:  # the kernel takes every shape (the GPU one pads to its power-of-two blocks)
        backend = jax.default_backend()
        default = backend in PALLAS_DEFAULT_BACKENDS and pallas_kernels.available(backend)
        impl = "pallas" if default else "xla"
    resolve_implementation(impl)
    if impl == "pallas":
        ids, weights, counts, probs, logits = pallas_kernels.top_k_gating(
            x_TxD, w_DxE, k, score=score, bias=bias, normalize=normalize, scale=scale,
            n_groups=n_groups, top_groups=top_groups, renorm_when_k1=renorm_when_k1,
            interpret=_interpret(),
        )  # fmt: skip
        r = routing.Routing(ids, weights, jnp.ones(ids.shape, bool), probs, logits)
        return r, counts
    logits = jnp.dot(
        x_TxD.astype(jnp.float32), w_DxE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    r = routing.top_k(
        logits,
        k,
        score=score,
        normalize=normalize,
        scale=scale,
        bias=bias,
        n_groups=n_groups,
        top_groups=top_groups,
        renorm_when_k1=renorm_when_k1,
    )
    counts = jnp.zeros(e, jnp.int32).at[r.expert_ids.reshape(-1)].add(1)
    return r, counts
