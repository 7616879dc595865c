"""`from_hf`: a local Hugging Face checkpoint directory -> `(ModelConfig, variables)`."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jmoe import sharding
from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import family_for
from jmoe.convert.families.common import HFConfig
from jmoe.convert.reader import CONFIG_FILE, HFCheckpoint
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.lm.param_layout import stack_layers
from jmoe.validation import DTYPES

log = logging.getLogger(__name__)


def abstract_variables(config: ModelConfig) -> dict:
    """Shapes and dtypes of `Transformer(config).init`'s variables (nothing is allocated)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens))


def _dtype_name(dtype, hf: HFConfig) -> str:
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in DTYPES:  # e.g. a float8 checkpoint, dequantised: bfloat16
            dtype = "bfloat16"
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"from_hf: dtype={dtype!r} is not supported: use one of {DTYPES}")
    return name


def _quantization(hf: HFConfig, ckpt: HFCheckpoint) -> None:
    """Checks `quantization_config`: FP8 with square blocks (dequantised by the reader) or
    MXFP4 (dequantised by the family's expert rules)."""
    quantization = dict(hf.get("quantization_config", {}) or {})
    method = quantization.get("quant_method")
    if method is None:
        return
    if method == "fp8":
        block = quantization.get("weight_block_size")
        fmt = quantization.get("fmt", "e4m3")
        if fmt != "e4m3" or not block or len(set(block)) != 1:
            raise CheckpointError(
                f"{hf.source}: unsupported quantization_config fmt={fmt!r}, "
                f"weight_block_size={block}: supported e4m3 with square blocks"
            )
        ckpt.fp8_block = block[0]
    elif method != "mxfp4":
        raise CheckpointError(
            f"{hf.source}: unsupported quantization_config.quant_method={method!r}: "
            "supported ('fp8', 'mxfp4')"
        )


def _place(array: np.ndarray, target) -> jax.Array:
    """`array` on the devices of `target` (a `Sharding`, or None for the default device)."""
    if target is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def from_hf(
    path: str | os.PathLike,
    *,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, dict]:
    """Reads a local Hugging Face model directory into a jmoe config and variables.

    Tensors are read lazily one at a time (`safetensors.safe_open`), converted, cast and placed
    before the next is read, so with a mesh only one tensor at a time is whole in host memory.

    Args:
      path: a directory with `config.json` and `model.safetensors` (or shards listed by
        `model.safetensors.index.json`); model types: see `jmoe.convert.SUPPORTED_MODEL_TYPES`.
      dtype: parameter and compute dtype (default: the checkpoint's `dtype`; bfloat16 for a
        quantised checkpoint).
      mesh: place each variable with its `jmoe.sharding.param_shardings` sharding on this mesh
        (default: the default device).
      scan_layers: return the scanned layer layout (`ModelConfig.scan_layers`).

    Returns:
      `(config, variables)` with `variables = {"params": ..., "moe_state": ...}` for
      `Transformer(config).apply(variables, tokens)`.

    Raises:
      CheckpointError: naming the file, tensor or config field that cannot be converted.
    """
    ckpt = HFCheckpoint(path)
    hf = HFConfig(ckpt.config, source=os.path.join(ckpt.path, CONFIG_FILE))
    model_type = hf.get("model_type")
    family = family_for(model_type, hf.source)
    _quantization(hf, ckpt)
    config = family.model_config(hf, _dtype_name(dtype, hf))
    hf.check_all_used(model_type)
    flat_config = dataclasses.replace(config, scan_layers=False)
    abstract = traverse_util.flatten_dict(abstract_variables(flat_config))
    targets = dict.fromkeys(abstract)
    if mesh is not None:
        targets = traverse_util.flatten_dict(
            sharding.param_shardings(traverse_util.unflatten_dict(abstract), mesh)
        )
    for name in family.skipped(config, ckpt):
        log.info("from_hf: skipping tensor %s", name)
        ckpt.skip(name)
    values = {}
    for rule in family.rules(flat_config, ckpt):
        for var_path, array in zip(rule.paths, rule.read(ckpt), strict=True):
            leaf = abstract[var_path]
            if array.shape != leaf.shape:  # a rule disagreeing with the model: a bug
                raise AssertionError(f"{'/'.join(var_path)}: {array.shape} != {leaf.shape}")
            values[var_path] = _place(array.astype(leaf.dtype, copy=False), targets[var_path])
    ckpt.close()
    if leftover := ckpt.unused():
        shown = ", ".join(f"{n} ({ckpt.weight_map[n]})" for n in leftover[:8])
        raise CheckpointError(
            f"{ckpt.path}: {len(leftover)} tensor(s) not used by the {model_type} conversion: "
            f"{shown}{' ...' if len(leftover) > 8 else ''}"
        )
    for var_path in abstract:
        if var_path in values:
            continue
        if var_path[0] != "moe_state":
            raise AssertionError(f"no tensor rule for {'/'.join(var_path)}")
        initial = config.moe.router.init_state(config.moe.num_experts, config.moe.chain_steps)
        values[var_path] = _place(np.asarray(initial[var_path[-1]]), targets[var_path])
    variables = traverse_util.unflatten_dict(values)
    if scan_layers:
        config, variables = _stacked(config, variables, mesh)
    return config, variables


def _stacked(config: ModelConfig, variables: dict, mesh) -> tuple[ModelConfig, dict]:
    """The variables in the scanned layout (`jmoe.lm.param_layout.stack_layers`)."""
    config = dataclasses.replace(config, scan_layers=True)

    def stack(tree):
        return {name: stack_layers(config, collection) for name, collection in tree.items()}

    out_shardings = None
    if mesh is not None:
        out_shardings = sharding.param_shardings(abstract_variables(config), mesh)
    return config, jax.jit(stack, out_shardings=out_shardings)(variables)
