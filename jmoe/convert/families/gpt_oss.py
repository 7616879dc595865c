"""GPT-OSS: attention with q/k/v/o biases, a learned sink logit per head and sliding-window
layers (`layer_types`), YaRN RoPE; every layer MoE with a router bias, softmax over the k best
logits, and clamped-SwiGLU experts with biases (gate/up columns interleaved in the checkpoint,
MXFP4-quantised in the released files).
"""

from __future__ import annotations

from jmoe.convert import rules
from jmoe.convert.families import common
from jmoe.convert.families.base import Family
from jmoe.lm.config import ModelConfig
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK

SWIGLU_ALPHA = 1.702  # fixed in the GPT-OSS code, not in config.json


class GptOss(Family):
    model_types = ("gpt_oss",)

    def model_config(self, hf, dtype):
        hf.require("hidden_act", ("silu",), "silu")
        hf.require("attention_bias", (True,), True, "GPT-OSS projections have biases")
        layer_types = tuple(hf.get("layer_types") or ())
        fields = common.llama_fields(hf, yarn=True)
        moe = MoEConfig(
            d_ff=hf.get("intermediate_size"),
            num_experts=hf.get("num_local_experts"),
            router=TopK(k=hf.get("num_experts_per_tok"), normalize=True, renorm_when_k1=True),
            router_bias=True,
            expert_bias=True,
            activation="clamped_swiglu",
            swiglu_alpha=SWIGLU_ALPHA,
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        )
        return ModelConfig(
            **fields,
            d_ff=hf.get("intermediate_size"),
            qkv_bias=True,
            o_bias=True,
            attention_sinks=True,
            sliding_window=hf.get("sliding_window"),
            layer_types=layer_types or None,
            moe=moe,
            dtype=dtype,
            param_dtype=dtype,
        )

    def hf_config(self, cfg):
        return dict(
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            **common.llama_hf_fields(cfg),
            intermediate_size=cfg.moe.d_ff,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.router.k,
            attention_bias=True,
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types or ["full_attention"] * cfg.n_layers),
            swiglu_limit=cfg.moe.swiglu_limit,
        )

    def matches(self, cfg):
        return (
            bool(getattr(cfg, "attention_sinks", False)) and cfg.moe.activation == "clamped_swiglu"
        )

    def rules(self, cfg, ckpt):
        d, e, f = cfg.d_model, cfg.moe.num_experts, cfg.moe.d_ff

        def moe_rules(i):
            hf = f"model.layers.{i}.mlp"
            names = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
            return [
                rules.linear(
                    common.layer_path(i, "moe", "router", "kernel"), f"{hf}.router.weight", (d, e)
                ),
                rules.copy(
                    common.layer_path(i, "moe", "router", "bias"), f"{hf}.router.bias", (e,)
                ),
                rules.InterleavedExperts(
                    tuple(common.layer_path(i, "moe", "experts", n) for n in names),
                    f"{hf}.experts",
                    e,
                    d,
                    f,
                ),
            ]

        return common.decoder_rules(cfg, moe_rules)
