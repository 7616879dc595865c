"""`to_hf`: a jmoe config and variables -> a Hugging Face model directory."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import FAMILIES, family_for
from jmoe.convert.reader import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from jmoe.lm.config import ModelConfig
from jmoe.lm.param_layout import unstack_layers

MAX_SHARD_BYTES = 5 * 2**30


def _family(config: ModelConfig, model_type: str | None):
    """The family to write and its `config.json` fields."""
    if model_type is not None:
        family = family_for(model_type, "to_hf")
        fields = family.hf_config(config) if family.matches(config) else {}
        if fields.get("model_type") != model_type:
            raise CheckpointError(f"to_hf: the ModelConfig does not fit model_type={model_type!r}")
        return family, fields
    for family in FAMILIES.values():
        if family.matches(config):
            return family, family.hf_config(config)
    raise CheckpointError(
        f"to_hf: the ModelConfig fits none of {tuple(FAMILIES)}: pass model_type=... to say "
        "which, or use a config built by jmoe.convert.from_hf"
    )


def _write_shards(tensors_iter, out_dir: str, max_shard_bytes: int) -> list[str]:
    """Writes `(name, array)` pairs into shards of at most `max_shard_bytes` (a larger single
    tensor gets its own). Returns `(weight_map, total tensor bytes)`; a single shard is named
    `model.safetensors`."""
    shards, current, size, total = [], {}, 0, 0

    def flush():
        name = f"shard-{len(shards):05d}.tmp"
        save_file(current, os.path.join(out_dir, name), metadata={"format": "pt"})
        shards.append((name, list(current)))

    for name, tensor in tensors_iter:
        if current and size + tensor.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = np.ascontiguousarray(tensor)
        size += tensor.nbytes
        total += tensor.nbytes
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0][0]), os.path.join(out_dir, SINGLE_FILE))
        return dict.fromkeys(shards[0][1], SINGLE_FILE), total
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(names, final))
    return weight_map, total


def to_hf(
    config: ModelConfig,
    variables: dict,
    out_dir: str | os.PathLike,
    *,
    model_type: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> str:
    """Writes `config.json` and safetensors (sharded with `model.safetensors.index.json` above
    `max_shard_bytes`) that transformers loads, and that `from_hf` reads back bit-identically.

    Args:
      config: the model config (either layer layout).
      variables: `{"params": ..., "moe_state": ...}` of `Transformer(config)`.
      out_dir: the directory to write (created if missing).
      model_type: the HF family; default: the first family the config fits.
      max_shard_bytes: largest shard before a new file is started.

    Returns:
      The HF `model_type` written.

    Raises:
      CheckpointError: the config fits no family, or a variable has no HF tensor.
      ValueError: the experts are quantized (`MoEConfig.expert_quantization`), which the HF
        families here do not hold.
    """
    if config.moe.expert_quantization is not None:
        raise ValueError(
            f"to_hf: the experts are quantized (expert_quantization="
            f"{config.moe.expert_quantization!r}) and Hugging Face checkpoints hold float experts: "
            "export the float model, or jmoe.compress.quantize.dequantize_experts first"
        )
    family, fields = _family(config, model_type)
    model_type = fields["model_type"]
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if config.scan_layers:
        variables = {k: unstack_layers(config, v) for k, v in variables.items()}
        config = dataclasses.replace(config, scan_layers=False)
    flat = traverse_util.flatten_dict(variables)  # fetched to the host one rule at a time
    rules = family.rules(config, None)
    written = {path for rule in rules for path in rule.paths}
    for path, value in flat.items():
        if path in written:
            continue
        if path[0] != "moe_state":
            raise CheckpointError(f"to_hf: {'/'.join(path)} has no {model_type} tensor")
        if np.any(
            jax.device_get(value)
        ):  # e.g. a trained selection bias the HF family does not have
            raise CheckpointError(
                f"to_hf: {'/'.join(path)} is non-zero but {model_type} has no such tensor"
            )

    def tensors():
        for rule in rules:
            arrays = tuple(np.asarray(jax.device_get(flat[p])) for p in rule.paths)
            yield from rule.write(arrays).items()

    weight_map, total = _write_shards(tensors(), out_dir, max_shard_bytes)
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
    return model_type
