"""OLMoE: every layer MoE, softmax top-k (renormalised with `norm_topk_prob`), RMSNorm over
the whole query and key projections (`qk_norm_scope="projection"`), no qkv clipping."""

from __future__ import annotations

from jmoe.convert.families import common
from jmoe.convert.families.base import Family
from jmoe.lm.config import ModelConfig
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK


class Olmoe(Family):
    model_types = ("olmoe",)

    def model_config(self, hf, dtype):
        common.check_silu(hf)
        hf.require("clip_qkv", (None,), None, "query/key/value clipping is not supported")
        hf.require("attention_bias", (False,), False, "OLMoE attention biases are not supported")
        d_ff = hf.get("intermediate_size")
        normalize = bool(hf.get("norm_topk_prob", False))
        moe = MoEConfig(
            d_ff=d_ff,
            num_experts=hf.get("num_experts"),
            router=TopK(k=hf.get("num_experts_per_tok"), normalize=normalize, renorm_when_k1=True),
        )
        return ModelConfig(
            **common.llama_fields(hf),
            d_ff=d_ff,
            qk_norm=True,
            qk_norm_scope="projection",
            moe=moe,
            dtype=dtype,
            param_dtype=dtype,
        )

    def hf_config(self, cfg):
        return dict(
            architectures=["OlmoeForCausalLM"],
            model_type="olmoe",
            **common.llama_hf_fields(cfg),
            intermediate_size=cfg.moe.d_ff,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.router.k,
            norm_topk_prob=cfg.moe.router.normalize,
            attention_bias=False,
            clip_qkv=None,
        )

    def matches(self, cfg):
        projection = cfg.qk_norm and cfg.qk_norm_scope == "projection"
        return (
            projection
            and not cfg.qkv_bias
            and cfg.moe.shared_width == 0
            and common.softmax_top_k(cfg)
        )

    def rules(self, cfg, ckpt):
        return common.decoder_rules(cfg, lambda i: common.routed_moe_rules(cfg, i))
