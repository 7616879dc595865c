"""jmoe.layout: layer runs, and the unrolled <-> scanned variable layouts, on plain trees."""

import numpy as np
import pytest

from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import (
    LayerKind,
    layer_locations,
    layer_segments,
    moe_layers,
    stack_layers,
    unstack_layers,
)

D, M = (LayerKind(moe=False),), (LayerKind(moe=True),)


def _config(n_layers, first_dense_layers, moe_every):
    return ModelConfig(
        n_layers=n_layers, first_dense_layers=first_dense_layers, moe_every=moe_every
    )


@pytest.mark.parametrize(
    "n_layers, first_dense, every, want",
    [
        (3, 0, 1, [(0, 3, M)]),
        (6, 1, 2, [(0, 1, D), (1, 2, M + D), (5, 1, M)]),
        (7, 0, 3, [(0, 2, M + D + D), (6, 1, M)]),
        (6, 0, 3, [(0, 2, M + D + D)]),
        (5, 0, 3, [(0, 1, M + D + D), (3, 1, M + D)]),
        (4, 0, 0, [(0, 4, D)]),
        (2, 5, 1, [(0, 2, D)]),
    ],
)
def test_layer_segments(n_layers, first_dense, every, want):
    cfg = _config(n_layers, first_dense, every)
    segments = layer_segments(cfg)
    assert segments == want
    # The runs cover every layer once, in order, with the config's layer kinds.
    kinds = [
        unit[u] for _, repeats, unit in segments for _ in range(repeats) for u in range(len(unit))
    ]
    assert [k.moe for k in kinds] == [cfg.is_moe_layer(i) for i in range(n_layers)]
    assert moe_layers(cfg) == [i for i, kind in enumerate(kinds) if kind.moe]


def _unrolled_tree(cfg, moe_only=False):
    """Per-layer leaves that record their layer index; "moe_state"-like when `moe_only`."""
    tree = {"embed": np.zeros(3)}
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            tree[f"layers_{i}"] = {"moe": {"bias": np.full((4,), float(i))}}
        elif not moe_only:
            tree[f"layers_{i}"] = {"mlp": {"w": np.full((2, 3), float(i))}}
    return tree


@pytest.mark.parametrize("moe_only", [False, True], ids=["params", "moe_state"])
def test_stack_unstack_round_trip(moe_only):
    cfg = _config(6, 1, 2)
    tree = _unrolled_tree(cfg, moe_only)
    stacked = stack_layers(cfg, tree)
    want_keys = {"embed", "stacks_1", "stacks_2"} | (set() if moe_only else {"stacks_0"})
    assert set(stacked) == want_keys
    # Run 1 is (MoE, dense) x 2 starting at layer 1: block_0 holds layers 1, 3; block_1 2, 4.
    np.testing.assert_array_equal(stacked["stacks_1"]["block_0"]["moe"]["bias"][:, 0], [1, 3])
    if not moe_only:
        np.testing.assert_array_equal(stacked["stacks_1"]["block_1"]["mlp"]["w"][:, 0, 0], [2, 4])
    assert stacked["stacks_2"]["block_0"]["moe"]["bias"].shape == (1, 4)
    unstacked = unstack_layers(cfg, stacked)
    assert set(unstacked) == set(tree)
    for key in tree:
        for got, want in zip(_leaves(unstacked[key]), _leaves(tree[key])):
            np.testing.assert_array_equal(got, want)


def _leaves(tree):
    return (
        [tree]
        if not isinstance(tree, dict)
        else [x for k in sorted(tree) for x in _leaves(tree[k])]
    )


def test_layer_locations():
    cfg = _config(4, 1, 2)
    assert layer_locations(cfg, scanned=False)[2] == (("layers_2",), None)
    assert layer_locations(cfg, scanned=True) == [
        (("stacks_0", "block_0"), 0),
        (("stacks_1", "block_0"), 0),
        (("stacks_1", "block_1"), 0),
        (("stacks_2", "block_0"), 0),
    ]
