"""Where each transformer layer's variables live, and conversion between the two layouts.

Unrolled (`scan_layers=False`): layer i is `layers_{i}`. Scanned: the layers are cut into runs
of identical units (`layer_segments`); run j is the `nn.scan` module `stacks_{j}`, whose unit
blocks `block_{u}` hold every variable with a leading repeat axis. Both layouts apply to any
per-layer collection ("params", "moe_state", gradients, optimizer moments); in "moe_state" only
the MoE layers have entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.lm.config import ModelConfig


def layer_segments(config: ModelConfig) -> list[tuple[int, int, tuple[bool, ...]]]:
    """Runs of identical layer units as `(first layer, repeats, unit)`; `unit[u]` is True for a
    MoE layer. A unit is one dense layer, or one MoE layer followed by `moe_every - 1` dense ones.
    """
    n, dense = config.n_layers, min(config.first_dense_layers, config.n_layers)
    if config.moe_every == 0:
        return [(0, n, (False,))]
    segments = [(0, dense, (False,))] if dense else []
    unit = (True,) + (False,) * (config.moe_every - 1)
    repeats, tail = divmod(n - dense, config.moe_every)
    if repeats:
        segments.append((dense, repeats, unit))
    if tail:
        segments.append((dense + repeats * config.moe_every, 1, unit[:tail]))
    return segments


def layer_locations(config: ModelConfig, scanned: bool) -> list[tuple[tuple[str, ...], int | None]]:
    """Where layer i's variables live: `(path, repeat index or None when unrolled)`."""
    if not scanned:
        return [((f"layers_{i}",), None) for i in range(config.n_layers)]
    return [
        ((f"stacks_{j}", f"block_{u}"), r)
        for j, (_, repeats, unit) in enumerate(layer_segments(config))
        for r in range(repeats)
        for u in range(len(unit))
    ]


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def unstack_layers(config: ModelConfig, tree: dict) -> dict:
    """A scanned-layout variable collection ("params" or "moe_state") in the unrolled layout."""
    out = {k: v for k, v in tree.items() if not k.startswith("stacks_")}
    for i, (path, r) in enumerate(layer_locations(config, scanned=True)):
        if (sub := _get(tree, path)) is not None:
            out[f"layers_{i}"] = jax.tree.map(lambda a, r=r: a[r], sub)
    return out


def stack_layers(config: ModelConfig, tree: dict) -> dict:
    """An unrolled-layout variable collection in the scanned layout of `config` (inverse of
    `unstack_layers`)."""
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    for j, (first, repeats, unit) in enumerate(layer_segments(config)):
        blocks = {
            f"block_{u}": jax.tree.map(
                lambda *a: jnp.stack(a),
                *(tree[f"layers_{first + r * len(unit) + u}"] for r in range(repeats)),
            )
            for u in range(len(unit))
            if f"layers_{first + u}" in tree
        }
        if blocks:
            out[f"stacks_{j}"] = blocks
    return out


def moe_layers(config: ModelConfig) -> list[int]:
    """Indices of the MoE layers (the order of the `[L_moe, ...]` stats)."""
    return [i for i in range(config.n_layers) if config.is_moe_layer(i)]
