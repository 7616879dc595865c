"""The expert MLP's activations, by name: the one table every implementation applies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's gated unit on the gate and up pre-activations:
    `gate = min(gate, limit)`, `up = clip(up, -limit, limit)`,
    `out = (up + 1) * gate * sigmoid(alpha * gate)`.

    A frozen dataclass, so an instance is hashable and compares by value (the implementations
    take it as a static argument)."""

    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * gate * jax.nn.sigmoid(self.alpha * gate)


# The gated units take the gate and up pre-activations, the others the up pre-activation alone.
# "clamped_swiglu" here has GPT-OSS's default alpha and limit; `activation_fn` sets others.
ACTIVATIONS: dict[str, Callable[..., jax.Array]] = {
    "swiglu": lambda gate, up: jax.nn.silu(gate) * up,
    "clamped_swiglu": ClampedSwiGLU(),
    "gelu": lambda up: jax.nn.gelu(up, approximate=False),
    "relu": jax.nn.relu,
}
GATED = ("swiglu", "clamped_swiglu")

# What the implementations take as `activation`: a name of `ACTIVATIONS` or a `ClampedSwiGLU`.
Activation = str | ClampedSwiGLU


def activation_fn(
    activation: Activation, *, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0
) -> Callable[..., jax.Array]:
    """The function of `activation`: a name of `ACTIVATIONS` ("clamped_swiglu" with the given
    alpha and limit), or a `ClampedSwiGLU` as it is."""
    if isinstance(activation, ClampedSwiGLU):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
    if activation == "clamped_swiglu":
        return ClampedSwiGLU(swiglu_alpha, swiglu_limit)
    return ACTIVATIONS[activation]


def is_gated(activation: Activation) -> bool:
    """Whether `activation` takes two input projections (gate and up)."""
    return isinstance(activation, ClampedSwiGLU) or activation in GATED
