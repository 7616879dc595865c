"""Hugging Face checkpoints in and out: `from_hf` reads a local HF model directory into a
`jmoe.lm.config.ModelConfig` and its variables, `to_hf` writes one back.

    config, variables = jmoe.convert.from_hf("path/to/Mixtral-8x7B", dtype="bfloat16")
    logits, _ = Transformer(config).apply(variables, tokens)
    jmoe.convert.to_hf(config, variables, "exported/")

Modules: `reader` (lazy safetensors reading), `rules` (tensor mappings), `families` (one module
per model family: config fields and tensor names), `loader` (`from_hf`), `writer` (`to_hf`),
`errors`.

Fixtures and the comparison with transformers need the optional extra; install the CPU build
of torch first (`pip install torch==2.13.0`), since plain torch pulls GBs of CUDA wheels, then
`pip install -e '.[hf]'`.
"""

from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import FAMILIES
from jmoe.convert.loader import from_hf
from jmoe.convert.writer import to_hf

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

__all__ = ["SUPPORTED_MODEL_TYPES", "CheckpointError", "from_hf", "to_hf"]
