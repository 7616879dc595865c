"""Where each transformer layer's variables live, and conversion between the two layouts.

Unrolled (`scan_layers=False`): layer i is `layers_{i}`. Scanned: the layers are cut into runs
of identical units (`layer_segments`; layers differ by FFN kind and attention window, and a scan
only stacks layers of one kind); run j is the `nn.scan` module `stacks_{j}`, whose unit
blocks `block_{u}` hold every variable with a leading repeat axis. Both layouts apply to any
per-layer collection ("params", "moe_state", gradients, optimizer moments); in "moe_state" only
the MoE layers have entries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmoe.lm.config import ModelConfig


class LayerKind(NamedTuple):
    """What makes two layers identical for `nn.scan`: a MoE or dense FFN, and the attention's
    sliding window (None: full attention)."""

    moe: bool
    window: int | None = None


def layer_kinds(config: ModelConfig) -> list[LayerKind]:
    """The kind of every layer, in order."""
    return [
        LayerKind(config.is_moe_layer(i), config.layer_window(i)) for i in range(config.n_layers)
    ]


def layer_segments(config: ModelConfig) -> list[tuple[int, int, tuple[LayerKind, ...]]]:
    """Runs of identical layer units as `(first layer, repeats, unit)`; `unit[u]` is the
    `LayerKind` of the unit's block u in every repeat.

    The leading dense layers (`first_dense_layers`) and the rest are cut separately. Each part
    repeats the shortest unit whose length is a multiple of its natural period (1 for the dense
    part, `moe_every` for the rest) and that the layer kinds repeat with: one MoE layer and
    `moe_every - 1` dense ones, or longer when the attention types alternate with another
    period (GPT-OSS's sliding / full pairs make a two-layer unit). A last, shorter unit holds
    what is left of a part.
    """
    kinds = layer_kinds(config)
    n = config.n_layers
    dense = n if config.moe_every == 0 else min(config.first_dense_layers, n)
    segments = []
    for first, end, period in ((0, dense, 1), (dense, n, config.moe_every)):
        part = kinds[first:end]
        if not part:
            continue
        size = _unit_size(part, period)
        repeats, tail = divmod(len(part), size)
        segments.append((first, repeats, tuple(part[:size])))
        if tail:
            segments.append((first + repeats * size, 1, tuple(part[:tail])))
    return segments


def _unit_size(kinds: list[LayerKind], period: int) -> int:
    """The smallest multiple of `period` that `kinds` repeat with, longer ones only where they
    repeat at least twice (else the whole length: one unit)."""
    for size in range(period, len(kinds), period):
        if size > period and 2 * size > len(kinds):
            break
        if all(kind == kinds[i % size] for i, kind in enumerate(kinds)):
            return size
    return len(kinds)


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
