"""Rewriting a model's MoE layers to another number of experts (what pruning and merging share).

Every MoE layer of a `ModelConfig` has the same `MoEConfig`, so a rewritten model keeps one
expert count E' for all its MoE layers. `moe_layer_weights` lists each MoE layer's weights in
the unrolled layout; `take_experts` keeps a subset of one layer's experts; `with_experts` puts
rewritten layers back into an ordinary model (config and variables) of E' experts, in the
variables' own layout (scanned or not).

A layer's weights (`MoELayerWeights`):
- `params`: the layer's `moe` subtree: `router/kernel` `[D, E_all]` (`[C, D, E_all]` for a
  chain of C routers; `E_all = E` plus any null experts, whose columns come last),
  `router/bias` `[E_all]` (`[C, E_all]`) with `router_bias`, `experts/*` with the expert axis
  first, and the shared expert (`shared/*`, `shared_gate/*`), which no rewrite touches;
- `state`: its `moe_state` subtree: the top-k selection `bias` `[E]` (`[C, E]`) and a compute
  `budget` scalar where the router has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import moe_layers, stack_layers, unstack_layers

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MoELayerWeights:
    """One MoE layer's weights: `layer` (its index in the model), its `moe` params and its
    `moe_state` (empty when the router keeps none)."""

    layer: int
    params: dict
    state: dict


def _unrolled(config: ModelConfig, tree: dict) -> dict:
    return unstack_layers(config, tree) if config.scan_layers else dict(tree)


def moe_layer_weights(config: ModelConfig, variables: Variables) -> list[MoELayerWeights]:
    """Each MoE layer's weights, in layer order (`variables` in either layout)."""
    params = _unrolled(config, variables["params"])
    state = _unrolled(config, variables.get("moe_state", {}))
    return [
        MoELayerWeights(
            i, params[f"layers_{i}"]["moe"], state.get(f"layers_{i}", {}).get("moe", {})
        )
        for i in moe_layers(config)
    ]


def take_experts(weights: MoELayerWeights, expert_ids: Sequence[int]) -> MoELayerWeights:
    """The layer with only the true experts `expert_ids` (in that order), their router columns,
    logit biases and selection biases; null-expert columns and the shared expert are kept.

    Raises:
      ValueError: an id outside `[0, E)` or repeated.
    """
    num_experts = _num_experts(weights.params)
    ids = np.asarray(expert_ids, np.int64).reshape(-1)
    if (
        len(set(ids.tolist())) != len(ids)
        or ids.size
        and not (0 <= ids.min() <= ids.max() < num_experts)
    ):
        raise ValueError(
            f"take_experts: expert_ids {ids.tolist()} must be distinct ids in [0, {num_experts})"
        )
    router = weights.params["router"]
    num_outputs = router["kernel"].shape[-1]
    # 1. Router columns: the kept true experts, then every null expert column unchanged.
    columns = np.concatenate([ids, np.arange(num_experts, num_outputs)])
    params = {
        **weights.params,
        "router": {name: a[..., columns] for name, a in router.items()},
        "experts": {name: a[ids] for name, a in weights.params["experts"].items()},
    }
    state = {name: a[..., ids] if name == "bias" else a for name, a in weights.state.items()}
    return MoELayerWeights(weights.layer, params, state)


def with_experts(
    config: ModelConfig, variables: Variables, layers: Sequence[MoELayerWeights]
) -> tuple[ModelConfig, Variables]:
    """An ordinary model whose MoE layers are `layers` (one per MoE layer, any order).

    The new expert count E' is the layers' own; the config's `moe.num_experts` becomes E' (its
    checks apply: a router's `k` above E', or groups that do not divide E', raise a ValueError
    naming the field). Variables come back in the layout they came in.

    Raises:
      ValueError: a MoE layer missing or repeated, or layers of different expert counts.
    """
    expected = moe_layers(config)
    by_layer = {w.layer: w for w in layers}
    if sorted(by_layer) != expected or len(layers) != len(expected):
        raise ValueError(
            f"with_experts: got layers {sorted(w.layer for w in layers)}, need each MoE layer "
            f"{expected} once"
        )
    counts = {w.layer: _num_experts(w.params) for w in layers}
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"with_experts: every MoE layer needs the same expert count (one MoEConfig), got "
            f"{counts}"
        )
    num_experts = next(iter(counts.values()))
    moe = dataclasses.replace(config.moe, num_experts=num_experts)
    new_config = dataclasses.replace(config, moe=moe)
    params = _unrolled(config, variables["params"])
    state = _unrolled(config, variables.get("moe_state", {}))
    for i, w in by_layer.items():
        params[f"layers_{i}"] = {**params[f"layers_{i}"], "moe": w.params}
        if w.state:
            state[f"layers_{i}"] = {**state.get(f"layers_{i}", {}), "moe": w.state}
    if config.scan_layers:
        params, state = stack_layers(new_config, params), stack_layers(new_config, state)
    out = {**variables, "params": params}
    if "moe_state" in variables:
        out["moe_state"] = state
    return new_config, out


def expert_param_bytes(config: ModelConfig, variables: Variables) -> int:
    """Bytes of every routed expert's weights and biases (and any quantization scales stored
    beside them) over all MoE layers: the memory pruning, merging and quantization shrink."""
    return sum(
        int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        for w in moe_layer_weights(config, variables)
        for a in jax.tree.leaves(w.params["experts"])
    )


def _num_experts(params: dict) -> int:
    return next(iter(params["experts"].values())).shape[0]
