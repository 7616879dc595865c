"""Upcycling whole language models: a dense `Transformer` into a MoE one, and a MoE model to more
experts, in either parameter layout (`scan_layers` or not; docs/algorithms.md, "Upcycling").

The per-layer rules are `jmoe.moe.upcycle`'s; null experts are added afterwards with
`map_moe_layers(lambda p: with_null_experts(p, m), params)` (AdaMoE's recipe).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.lm.param_layout import stack_layers, unstack_layers
from jmoe.moe.upcycle import grow_experts, upcycle_layer

# Fields in which an upcycled model may differ from its dense source.
_MOE_FIELDS = ("moe", "moe_every", "first_dense_layers", "scan_layers", "remat")


def map_moe_layers(fn: Callable[[dict], dict], tree: dict) -> dict:
    """`tree` with every MoE layer's subtree (`.../moe`) replaced by `fn(subtree)`, in either
    layout (scanned subtrees carry a leading layer axis, which the `jmoe.moe.upcycle` functions
    and `with_null_experts` keep)."""
    return {
        key: fn(value) if key == "moe" else map_moe_layers(fn, value)
        if isinstance(value, dict) else value
        for key, value in tree.items()
    }  # fmt: skip


def upcycle_model(
    dense_config: ModelConfig,
    dense_variables: dict,
    config: ModelConfig,
    rng: jax.Array,
    *,
    noise_std: float = 0.0,
) -> dict:
    """The variables of `Transformer(config)` from a trained dense `Transformer(dense_config)`.

    Attention, norms, embeddings and the dense layers are copied; each MoE layer of `config` is
    `upcycle_layer` of the dense FFN at the same depth (every expert a copy, uniform routing).
    Parameters without a dense counterpart (a shared expert's, the shared gate) come from
    `Transformer(config).init(rng, ...)`, and `moe_state` from that init too.

    Args:
      dense_config: the dense model (`moe_every=0`).
      dense_variables: its variables (`{"params": ...}`), in its layout.
      config: the MoE model: `dense_config` with other `moe`, `moe_every`, `first_dense_layers`,
        `scan_layers` or `remat`; its `moe.d_ff` is the dense `d_ff`, its activation "swiglu".
      rng: key for the init and the noise.
      noise_std: noise on each expert's copy (0: exact copies).

    Returns:
      `{"params": ..., "moe_state": ...}` in `config`'s layout. With `noise_std=0` and a
      renormalised top-k router the logits equal the dense model's (`upcycle_layer`).
    """
    if dense_config.moe_every != 0:
        raise ValueError(
            f"upcycle_model: dense_config.moe_every={dense_config.moe_every}; the source must be "
            "a dense model (moe_every=0)"
        )
    same = dataclasses.replace(dense_config, **{f: getattr(config, f) for f in _MOE_FIELDS})
    if same != config:
        differ = [
            f.name
            for f in dataclasses.fields(config)
            if getattr(same, f.name) != getattr(config, f.name)
        ]
        raise ValueError(
            f"upcycle_model: config differs from dense_config in {differ}; only {_MOE_FIELDS} "
            "may change"
        )
    if config.moe.activation != "swiglu":
        raise ValueError(
            f"upcycle_model: config.moe.activation={config.moe.activation!r}; the experts copy the "
            'dense SwiGLU FFN, so use activation="swiglu"'
        )
    init_key, noise_key = jax.random.split(rng)
    tokens = jnp.zeros((1, 1), jnp.int32)
    template = jax.jit(Transformer(config).init)(init_key, tokens)
    dense = dense_variables["params"]
    if dense_config.scan_layers:
        dense = unstack_layers(dense_config, dense)
    moe_template = template["params"]
    if config.scan_layers:
        moe_template = unstack_layers(config, moe_template)
    params = {k: v for k, v in dense.items() if not k.startswith("layers_")}
    for i in range(config.n_layers):
        layer = dense[f"layers_{i}"]
        if config.is_moe_layer(i):
            layer = {k: v for k, v in layer.items() if k != "mlp"}
            layer["moe"] = upcycle_layer(
                dense[f"layers_{i}"]["mlp"],
                moe_template[f"layers_{i}"]["moe"],
                noise_std=noise_std,
                rng=jax.random.fold_in(noise_key, i),
            )
        params[f"layers_{i}"] = layer
    if config.scan_layers:
        params = stack_layers(config, params)
    return {"params": params, "moe_state": template.get("moe_state", {})}


def grow_model_experts(
    variables: dict,
    num_experts: int,
    *,
    rng: jax.Array | None = None,
    **options,
) -> dict:
    """Every MoE layer of a model's variables grown to `num_experts` experts (`grow_experts`),
    in either layout; the model's config then needs `moe.num_experts=num_experts`.

    Args:
      variables: `{"params": ..., "moe_state": ...}` of a `Transformer`.
      num_experts: the new expert count.
      rng: a key when noise is asked for (folded with the layer's position for each layer).
      **options: `source`, `noise_std`, `expert_noise_std` of `grow_experts`.
    """
    states = variables.get("moe_state", {})
    counter = itertools.count()  # one noise key per MoE layer, in tree order

    def walk(params: dict, state: dict) -> tuple[dict, dict]:
        out_params, out_state = dict(params), dict(state)
        for key, value in params.items():
            if not isinstance(value, dict):
                continue
            sub_state = state.get(key, {})
            if key == "moe":
                key_rng = None if rng is None else jax.random.fold_in(rng, next(counter))
                grown = grow_experts(value, sub_state, num_experts, rng=key_rng, **options)
            else:
                grown = walk(value, sub_state)
            out_params[key] = grown[0]
            if key in state:
                out_state[key] = grown[1]
        return out_params, out_state

    params, moe_state = walk(variables["params"], states)
    return {**variables, "params": params, "moe_state": moe_state}
