"""`Family`: one Hugging Face model family's config mapping and tensor rules."""

from __future__ import annotations

from jmoe.convert.families.common import HFConfig
from jmoe.convert.reader import HFCheckpoint
from jmoe.convert.rules import Rule
from jmoe.lm.config import ModelConfig


class Family:
    """A model family (`model_types` are its HF `model_type` values).

    Subclasses implement `model_config` (HF `config.json` fields -> `ModelConfig`), `hf_config`
    (the inverse) and `rules` (the tensor rules of a config).
    """

    model_types: tuple[str, ...] = ()

    def model_config(self, hf: HFConfig, dtype: str) -> ModelConfig:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig) -> dict:
        raise NotImplementedError

    def matches(self, cfg: ModelConfig) -> bool:
        """Whether `cfg` has this family's shape (`to_hf` without a `model_type`)."""
        return False

    def rules(self, cfg: ModelConfig, ckpt: HFCheckpoint | None) -> list[Rule]:
        """The tensor rules; `ckpt` is the checkpoint being read (None when writing), for
        families whose tensor names differ between checkpoint versions."""
        raise NotImplementedError

    def skipped(self, cfg: ModelConfig, ckpt: HFCheckpoint) -> list[str]:
        """Tensor names deliberately left out of the conversion (default: none)."""
        return []
