"""Hugging Face checkpoints in and out: `from_hf` reads a local HF model directory into a
`jmoe.lm.config.ModelConfig` and its variables.

    config, variables = jmoe.convert.from_hf("path/to/Mixtral-8x7B", dtype="bfloat16")
    logits, _ = Transformer(config).apply(variables, tokens)

Modules: `reader` (lazy safetensors reading), `rules` (tensor mappings), `families` (one module
per model family: config fields and tensor names), `loader` (`from_hf`), `errors`.
"""

from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import FAMILIES
from jmoe.convert.loader import from_hf

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

__all__ = ["SUPPORTED_MODEL_TYPES", "CheckpointError", "from_hf"]
