"""The expert MLP's activations, by name: the one table every implementation applies."""

from __future__ import annotations

from collections.abc import Callable

import jax

# "swiglu" takes the gate and up pre-activations, the others the up pre-activation alone.
ACTIVATIONS: dict[str, Callable[..., jax.Array]] = {
    "swiglu": lambda gate, up: jax.nn.silu(gate) * up,
    "gelu": lambda up: jax.nn.gelu(up, approximate=False),
    "relu": jax.nn.relu,
}
