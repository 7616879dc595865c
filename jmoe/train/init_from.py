"""Fine-tuning a Hugging Face checkpoint: `model.init_from=DIR`.

The checkpoint decides the model: its `config.json` gives every field that shapes the weights or
the math (`checkpoint_model_config`), and its tokenizer is the run's. A run may still set how
it trains (`OVERRIDABLE`: dtypes, layer scan, remat, context length, the attention and
grouped-matmul implementations, the MoE losses and capacity) and the routing rule,
`model.moe.router` and its fields:
`model.moe.router=null_experts model.moe.router.num_null=4 model.moe.router.k=4` adds null
experts to the imported router (AdaMoE; `jmoe.moe.layer.with_null_experts`),
`model.moe.router=top_p` routes by dynamic top-p. Any other model key that disagrees with the
checkpoint is refused with the checkpoint's value.

At step 0 the run's weights are the checkpoint's (`initial_variables`), so a plain
`model.init_from` run's first loss is the imported model's loss on that batch.
"""

from __future__ import annotations

import dataclasses
import os

from flax import traverse_util

from jmoe.convert import from_hf
from jmoe.convert.families import family_for
from jmoe.convert.families.common import HFConfig
from jmoe.convert.loader import abstract_variables
from jmoe.convert.reader import CONFIG_FILE, HFCheckpoint
from jmoe.lm.config import ModelConfig
from jmoe.moe.layer import with_null_experts
from jmoe.moe.routers import NullExperts
from jmoe.train.errors import UserError

# Model keys a run may set on an imported model: how it trains, not what the weights mean.
OVERRIDABLE = (
    "init_from",
    "max_seq_len",
    "scan_layers",
    "remat",
    "dtype",
    "param_dtype",
    "attention_impl",
    "moe.router",
    "moe.router_jitter",
    "moe.capacity_factor",
    "moe.eval_capacity_factor",
    "moe.capacity_includes_k",
    "moe.capacity_rounding",
    "moe.min_capacity",
    "moe.implementation",
    "moe.lb_coef",
    "moe.lb_normalization",
    "moe.z_loss_coef",
    "moe.entropy_coef",
    "moe.dtype",
    "moe.param_dtype",
)
TRAIN_DTYPE = "float32"  # parameters train in float32 unless the run says otherwise


def checkpoint_model_config(path: str | os.PathLike, dtype: str = TRAIN_DTYPE) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face checkpoint directory, from its `config.json` alone
    (no weights are read); its `init_from` is the directory's absolute path.

    Raises:
      UserError: the directory is not a checkpoint `jmoe.convert` reads (the message names the
        file or field).
    """
    try:
        ckpt = HFCheckpoint(os.path.expanduser(path))
        hf = HFConfig(ckpt.config, source=os.path.join(ckpt.path, CONFIG_FILE))
        model_type = hf.get("model_type")
        config = family_for(model_type, hf.source).model_config(hf, dtype)
        hf.get("quantization_config")  # the weights' storage; `from_hf` checks and reads it
        hf.check_all_used(model_type)
    except ValueError as e:  # CheckpointError
        raise UserError(f"model.init_from={os.fspath(path)!r}: {e}") from None
    return dataclasses.replace(config, init_from=os.path.abspath(os.path.expanduser(path)))


def leaf_keys(tree, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a nested override dict (a router given by kind alone,
    `router: top_p`, is the leaf `router`)."""
    if not isinstance(tree, dict):
        return [prefix.rstrip(".")]
    return [k for key, value in tree.items() for k in leaf_keys(value, f"{prefix}{key}.")]


def check_model_overrides(imported: dict, given: dict, merged: dict, init_from: str) -> None:
    """Refuses model keys that a run set (`given`, the model part of its YAML and overrides,
    whose merged values are `merged`) where they differ from the checkpoint's (`imported`)."""
    for key in leaf_keys(given):
        if any(key == k or key.startswith(f"{k}.") for k in OVERRIDABLE):
            continue
        want, have = _get(merged, key), _get(imported, key)
        if want != have:
            raise UserError(
                f"model.{key}={want!r} conflicts with model.init_from={init_from!r}, whose "
                f"config.json gives {have!r}: the imported model's shape and math come from the "
                "checkpoint; drop this override (a run may set "
                f"{', '.join('model.' + k for k in OVERRIDABLE[1:])})"
            )


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def initial_variables(model_config: ModelConfig, mesh=None) -> dict:
    """The run's step-0 variables: the checkpoint's weights in the run's layout and dtypes.

    A `NullExperts` router on a checkpoint trained without null experts gets its null-expert
    router columns from `with_null_experts`. The checkpoint's `moe_state` (e.g. DeepSeek-V3's
    selection bias) is kept while the router kind is the checkpoint's own; a router of another
    kind starts from its fresh state (the "moe_state" key is then absent).

    Raises:
      UserError: when a converted weight does not fit the run's model (its path and shapes).
    """
    source = model_config.init_from
    try:
        imported_config, variables = from_hf(
            source, dtype=TRAIN_DTYPE, mesh=mesh, scan_layers=model_config.scan_layers
        )
    except ValueError as e:  # CheckpointError
        raise UserError(f"model.init_from={source!r}: {e}") from None
    params = variables["params"]
    router, imported_router = model_config.moe.router, imported_config.moe.router
    if isinstance(router, NullExperts) and not isinstance(imported_router, NullExperts):
        params = _map_moe_layers(params, lambda p: with_null_experts(p, router.num_null))
    abstract = abstract_variables(model_config)
    out = {"params": _fitted(source, params, abstract["params"])}
    if type(router) is type(imported_router):
        out["moe_state"] = _fitted(
            source, variables.get("moe_state", {}), abstract.get("moe_state", {})
        )
    return out


def _fitted(source: str, tree: dict, abstract: dict) -> dict:
    """`tree` cast to the dtypes of `abstract`, whose every leaf it must have, same shape."""
    flat_have = traverse_util.flatten_dict(tree)
    fitted = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        have = flat_have.get(path)
        if have is None or have.shape != leaf.shape:
            shape = None if have is None else have.shape
            raise UserError(
                f"model.init_from={source!r}: the run's model needs {'/'.join(path)} of shape "
                f"{leaf.shape}, the checkpoint gives {shape}"
            )
        fitted[path] = have.astype(leaf.dtype)
    return traverse_util.unflatten_dict(fitted)


def _map_moe_layers(params: dict, fn) -> dict:
    """`fn` applied to every MoE layer's params (any subtree holding "router")."""
    if "router" in params:
        return fn(params)
    return {k: _map_moe_layers(v, fn) if isinstance(v, dict) else v for k, v in params.items()}
