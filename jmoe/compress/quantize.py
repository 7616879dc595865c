"""Weight-only quantized experts: every MoE layer's routed expert weights as int8 or fp8.

`quantize_experts` stores each expert weight `w_gate` / `w_up` / `w_down` (`[E, K, N]`) as int8
or float8 e4m3 with float32 column scales `<name>_scale` `[E, N]` (symmetric, one scale per expert
and output column: `jmoe.kernels.quantization`) and sets `MoEConfig.expert_quantization`. The
grouped matmul dequantises inside its loop, one expert's matrix at a time, so the model's expert
memory shrinks about 4x from float32 (2x from bfloat16) with no full-precision copy at run time.
The router, the shared expert, attention, embeddings and the expert biases stay float.
"""

from __future__ import annotations

import dataclasses

from jmoe.compress import surgery
from jmoe.kernels.quantization import check_kind, dequantize, quantize
from jmoe.lm.config import ModelConfig
from jmoe.moe import stats

SCALE_SUFFIX = "_scale"


def quantize_experts(
    config: ModelConfig, variables: surgery.Variables, kind: str
) -> tuple[ModelConfig, surgery.Variables]:
    """The model with every MoE layer's expert weights quantized to `kind`.

    Args:
      config: a model with float experts (either layer layout).
      variables: `{"params": ..., "moe_state": ...}` of `Transformer(config)`.
      kind: "int8" or "fp8".

    Returns:
      `(config with moe.expert_quantization=kind, variables)` in the variables' own layout.

    Raises:
      ValueError: an unknown `kind`, or experts that are already quantized.
    """
    check_kind(kind)
    if config.moe.expert_quantization is not None:
        raise ValueError(
            f"quantize_experts: the experts are already quantized "
            f"(expert_quantization={config.moe.expert_quantization!r}); quantize the float model"
        )

    def rewrite(experts: dict) -> dict:
        out = dict(experts)
        for name in _weight_names(config):
            out[name], out[name + SCALE_SUFFIX] = quantize(experts[name], kind)
        return out

    return _rewrite_experts(config, variables, rewrite, kind)


def dequantize_experts(
    config: ModelConfig, variables: surgery.Variables
) -> tuple[ModelConfig, surgery.Variables]:
    """The float model a quantized one stands for (`w = q * scale` in `config.param_dtype`), with
    `expert_quantization=None`: for export (`jmoe.convert.to_hf`) or fine-tuning.

    Raises:
      ValueError: the experts are not quantized.
    """
    if config.moe.expert_quantization is None:
        raise ValueError("dequantize_experts: the experts are not quantized (expert_quantization)")

    def rewrite(experts: dict) -> dict:
        out = dict(experts)
        for name in _weight_names(config):
            scale = out.pop(name + SCALE_SUFFIX)
            out[name] = dequantize(experts[name], scale, config.param_dtype)
        return out

    return _rewrite_experts(config, variables, rewrite, None)


def quantize_method(kind: str):
    """`(config, variables, context) -> (config, variables)`: `quantize_experts` to `kind` as a
    compression method of a method registry (it needs nothing from `context`)."""
    check_kind(kind)

    def method(config: ModelConfig, variables: surgery.Variables, context=None):
        return quantize_experts(config, variables, kind)

    return method


def _weight_names(config: ModelConfig) -> tuple[str, ...]:
    return (*stats.mlp_weight_names(config.moe.activation), "w_down")


def _rewrite_experts(config, variables, rewrite, kind):
    layers = [
        dataclasses.replace(w, params={**w.params, "experts": rewrite(w.params["experts"])})
        for w in surgery.moe_layer_weights(config, variables)
    ]
    new_config, new_variables = surgery.with_experts(config, variables, layers)
    moe = dataclasses.replace(new_config.moe, expert_quantization=kind)
    return dataclasses.replace(new_config, moe=moe), new_variables
