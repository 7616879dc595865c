"""The router's decisions on given tokens, per MoE layer: what router statistics, pruning and
merging are computed from."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.lm.param_layout import moe_layers, unstack_layers
from jmoe.moe.routing import Routing


def unrolled(config: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """The model in the unrolled layer layout (a scanned model's stacks split per layer), without
    remat: the layout whose per-layer intermediates can be read."""
    if config.scan_layers:
        variables = {name: unstack_layers(config, tree) for name, tree in variables.items()}
    return dataclasses.replace(config, scan_layers=False, remat="none"), variables


def layer_routings(
    config: ModelConfig,
    variables: dict,
    tokens_BxS: jax.Array,
    token_mask_BxS: jax.Array | None = None,
) -> dict[int, tuple[Routing, ...]]:
    """Each MoE layer's routing of the `B * S` tokens (one `Routing` per chain step), from a
    deterministic forward pass.

    Args:
      config, variables: the model (either layer layout).
      tokens_BxS: int token ids.
      token_mask_BxS: optional bool, False for padding (the routings still cover every token;
        the mask only keeps padding out of the layer's losses).

    Returns:
      `{layer index: (Routing, ...)}` with `[B * S, ...]` arrays: `logits` / `probs`
      `[T, E_all]`, `expert_ids` / `weights` / `valid` `[T, K]`.
    """
    config, variables = unrolled(config, variables)
    mask = None if token_mask_BxS is None else jnp.asarray(token_mask_BxS, bool)
    sown = _sown_routings(config, variables, jnp.asarray(tokens_BxS, jnp.int32), mask)
    return {i: tuple(sown[f"layers_{i}"]["moe"]["routing"]) for i in moe_layers(config)}


@functools.partial(jax.jit, static_argnums=0)
def _sown_routings(config: ModelConfig, variables, tokens_BxS, token_mask_BxS):
    _, state = Transformer(config).apply(
        variables, tokens_BxS, token_mask_BxS=token_mask_BxS, mutable=["intermediates"]
    )
    return state["intermediates"]
