"""Model families by HF `model_type`: each maps `config.json` and the tensor names."""

from __future__ import annotations

from jmoe.convert.errors import CheckpointError
from jmoe.convert.families.base import Family
from jmoe.convert.families.deepseek_v3 import DeepseekV3
from jmoe.convert.families.gpt_oss import GptOss
from jmoe.convert.families.mixtral import Mixtral
from jmoe.convert.families.olmoe import Olmoe
from jmoe.convert.families.qwen_moe import QwenMoe

FAMILIES: dict[str, Family] = {
    t: family
    for family in (Mixtral(), Olmoe(), QwenMoe(), DeepseekV3(), GptOss())
    for t in family.model_types
}


def family_for(model_type: str | None, source: str = "config.json") -> Family:
    """The family of `model_type`, or a `CheckpointError` listing the supported ones."""
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: unsupported model_type={model_type!r}: supported {tuple(FAMILIES)}"
        )
    return FAMILIES[model_type]
