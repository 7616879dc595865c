"""Mixtral: every layer MoE, softmax top-k renormalised (also when k == 1), no shared expert.

Tensors: `model.layers.{i}.mlp.gate.weight` and the fused `mlp.experts.gate_up_proj` /
`down_proj` (transformers 5), or `block_sparse_moe.gate.weight` and per-expert
`block_sparse_moe.experts.{j}.w1 / w3 / w2` (gate / up / down) in older checkpoints.
"""

from __future__ import annotations

from jmoe.convert import rules
from jmoe.convert.families import common
from jmoe.convert.families.base import Family
from jmoe.lm.config import ModelConfig
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK


class Mixtral(Family):
    model_types = ("mixtral",)

    def model_config(self, hf, dtype):
        common.check_silu(hf)
        hf.require("sliding_window", (None,), None, "sliding-window attention is not supported")
        d_ff = hf.get("intermediate_size")
        moe = MoEConfig(
            d_ff=d_ff,
            num_experts=hf.get("num_local_experts"),
            router=TopK(k=hf.get("num_experts_per_tok"), normalize=True, renorm_when_k1=True),
        )
        return ModelConfig(
            **common.llama_fields(hf), d_ff=d_ff, moe=moe, dtype=dtype, param_dtype=dtype
        )

    def hf_config(self, cfg):
        return dict(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            **common.llama_hf_fields(cfg),
            intermediate_size=cfg.moe.d_ff,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.router.k,
            sliding_window=None,
        )

    def matches(self, cfg):
        plain = not (cfg.qk_norm or cfg.qkv_bias or cfg.moe.shared_width)
        layout = cfg.first_dense_layers == 0 and cfg.moe_every == 1
        return plain and layout and common.softmax_top_k(cfg) and cfg.moe.router.normalize

    def rules(self, cfg, ckpt):
        d, e, f = cfg.d_model, cfg.moe.num_experts, cfg.moe.d_ff
        legacy = ckpt is not None and "model.layers.0.block_sparse_moe.gate.weight" in ckpt

        def moe_rules(i):
            hf = f"model.layers.{i}.{'block_sparse_moe' if legacy else 'mlp'}"
            router = common.layer_path(i, "moe", "router", "kernel")
            return [
                rules.linear(router, f"{hf}.gate.weight", (d, e)),
                rules.Experts(
                    common.expert_paths(i),
                    f"{hf}.experts",
                    e,
                    d,
                    f,
                    names=("w1", "w3", "w2") if legacy else ("gate_proj", "up_proj", "down_proj"),
                ),
            ]

        return common.decoder_rules(cfg, moe_rules)
