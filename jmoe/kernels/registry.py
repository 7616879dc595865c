"""The grouped-matmul registry: every implementation by name, and one fallback order per backend.

`resolve` is the one place that turns `implementation=None | name` into an implementation, for
each op the MoE layer runs:
- "grouped_matmul": `y[r] = x[r] @ w[group(r)]` (`jmoe.kernels.grouped_matmul`);
- "expert_mlp": each row's expert MLP (`jmoe.kernels.expert_mlp`);
- "gating": the router matmul and top-k; "pallas" fuses them into one kernel, "xla" leaves them
  to plain XLA ops on the caller's side (`jmoe.kernels.gating_implementation`).

`implementation=None` takes the first implementation of `fallback_order(backend)` that supports
the op, the shapes and the dtype. A forced name is used whatever the shapes (the Pallas kernels run
interpreted off TPU and GPU); an implementation without the op (only "ragged_dot" has no gating)
runs its always-working XLA twin. Quantized weights (`jmoe.kernels.quantization`) are taken by
"xla" and "ragged_dot" only: `implementation=None` never picks "pallas" for them, and a forced
"pallas" runs the XLA twin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jmoe.kernels import pallas, ragged_dot, xla_tiled

OPS = ("grouped_matmul", "expert_mlp", "gating")


def _any_shape(backend: str, shapes: tuple[tuple[int, int], ...], dtype) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the ops, and what it supports.

    Attributes:
      name: the `implementation=` string.
      ops: the ops of `OPS` it computes.
      grouped_matmul: `(x_MxK, w_GxKxN, group_sizes_G) -> y_MxN`.
      expert_mlp: `(x_MxD, w_in, w_down_GxFxD, group_sizes_G, activation) -> y_MxD`.
      supports: `(backend, shapes, dtype) -> bool`: whether `implementation=None` may pick it on
        `backend` for matmuls `[*, k] x [k, n]` of every `(k, n)` in `shapes`, in `dtype`.
      quantized: whether its ops take quantized weights with column scales (extra trailing
        arguments: `scale_GxN` of `grouped_matmul`; `scales_in, scale_down_GxD` of
        `expert_mlp`).
    """

    name: str
    ops: tuple[str, ...]
    grouped_matmul: Callable[..., jax.Array]
    expert_mlp: Callable[..., jax.Array]
    supports: Callable[[str, tuple[tuple[int, int], ...], object], bool] = _any_shape
    quantized: bool = False


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("xla", OPS, xla_tiled.grouped_matmul, xla_tiled.expert_mlp, quantized=True),
        Implementation(
            "ragged_dot",
            ("grouped_matmul", "expert_mlp"),
            ragged_dot.grouped_matmul,
            ragged_dot.expert_mlp,
            quantized=True,
        ),
        Implementation("pallas", OPS, pallas.grouped_matmul, pallas.expert_mlp, pallas.supports),
    )
}
# Backends where `implementation=None` tries the Pallas kernels first: those whose compiled kernel
# tests (`tests/pallas_kernels/test_compiled.py`) have passed on the real hardware. None has yet,
# so "pallas" is opt-in everywhere; add "tpu" / "gpu" here once they do. Read at each resolve from
# this module (`jmoe.kernels.PALLAS_DEFAULT_BACKENDS` is a copy for reading).
PALLAS_DEFAULT_BACKENDS: tuple[str, ...] = ()
# After the Pallas kernels: "ragged_dot" only where XLA lowers it to a grouped kernel (TPU; on CPU
# and reportedly recent NVIDIA GPUs it computes every group densely), then the XLA loop, whose
# cost follows the routed rows on every backend.
_ORDER_AFTER_PALLAS = {"tpu": ("ragged_dot", "xla"), "gpu": ("xla",), "cpu": ("xla",)}


def fallback_order(backend: str) -> tuple[str, ...]:
    """The implementations `implementation=None` tries on `backend`, best first; "xla" is last
    (it computes every op at every shape, so the search always ends)."""
    pallas_first = ("pallas",) if backend in PALLAS_DEFAULT_BACKENDS else ()
    return pallas_first + _ORDER_AFTER_PALLAS.get(backend, ("xla",))


def check_name(implementation: str | None) -> None:
    """Raises a ValueError naming the allowed values unless `implementation` is one of them."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {(None, *IMPLEMENTATIONS)}"
        )


def resolve(
    op: str,
    implementation: str | None = None,
    *,
    shapes: tuple[tuple[int, int], ...] = (),
    dtype=None,
    quantized: bool = False,
) -> Implementation:
    """The implementation that runs `op` on the default backend.

    Args:
      op: one of `OPS`.
      implementation: None (the first of `fallback_order` that supports `op`, `shapes` and
        `dtype`) or a name of `IMPLEMENTATIONS` (used if it has `op`, else "xla").
      shapes: `(k, n)` of each `[*, k] x [k, n]` matmul the op runs.
      dtype: the rows' dtype.
      quantized: the weights are quantized: only implementations that take them qualify (a
        forced one that does not runs the XLA twin).
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of {OPS}")
    check_name(implementation)
    backend = jax.default_backend()
    forced = implementation is not None
    order = (implementation, "xla") if forced else fallback_order(backend)
    return next(
        impl
        for impl in map(IMPLEMENTATIONS.__getitem__, order)
        if op in impl.ops
        and (impl.quantized or not quantized)
        and (forced or impl.supports(backend, shapes, dtype))
    )
