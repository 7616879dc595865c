"""Qwen2-MoE and Qwen3-MoE: softmax top-k (renormalised with `norm_topk_prob`), MoE layers
every `decoder_sparse_step` after the `mlp_only_layers`; Qwen2-MoE adds qkv biases and a shared
expert behind a sigmoid gate, Qwen3-MoE a per-head qk-norm. Sliding-window attention is refused.
"""

from __future__ import annotations

from jmoe.convert import rules
from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import common
from jmoe.convert.families.base import Family
from jmoe.lm.config import ModelConfig
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK


class QwenMoe(Family):
    """Both Qwen MoE generations; `shared_expert` tells them apart."""

    model_types = ("qwen2_moe", "qwen3_moe")

    def model_config(self, hf, dtype):
        model_type = hf.get("model_type")
        qwen2 = model_type == "qwen2_moe"
        common.check_silu(hf)
        hf.require("use_sliding_window", (False,), False, "sliding-window attention")
        hf.get("sliding_window")  # only used with use_sliding_window
        hf.get("max_window_layers")
        layer_types = hf.get("layer_types")
        if layer_types and set(layer_types) != {"full_attention"}:
            raise CheckpointError(
                f"{hf.source}: unsupported layer_types={layer_types}: only 'full_attention'"
            )
        if qwen2:
            qkv_bias = bool(hf.get("qkv_bias", True))
        else:
            qkv_bias = bool(hf.require("attention_bias", (False, True), False))
        n_layers = hf.get("num_hidden_layers")
        # 1. Qwen3-MoE files of transformers 5 spell num_experts as num_local_experts.
        num_experts = hf.get("num_local_experts") or hf.get("num_experts", 0)
        if not num_experts:
            raise CheckpointError(f"{hf.source}: num_experts=0 (a dense model) is not supported")
        shared = hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0
        moe = MoEConfig(
            d_ff=hf.get("moe_intermediate_size"),
            num_experts=num_experts,
            router=TopK(
                k=hf.get("num_experts_per_tok"),
                normalize=bool(hf.get("norm_topk_prob", False)),
                renorm_when_k1=True,
            ),
            d_ff_shared=shared or None,
            shared_gate=bool(shared),
        )
        return ModelConfig(
            **common.llama_fields(hf),
            **common.sparse_layout(hf, n_layers),
            d_ff=hf.get("intermediate_size"),
            qkv_bias=qkv_bias,
            qk_norm=not qwen2,
            qk_norm_scope="head",
            moe=moe,
            dtype=dtype,
            param_dtype=dtype,
        )

    def hf_config(self, cfg):
        qwen2 = not cfg.qk_norm
        out = dict(
            architectures=["Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"],
            model_type="qwen2_moe" if qwen2 else "qwen3_moe",
            **common.llama_hf_fields(cfg),
            intermediate_size=cfg.d_ff,
            moe_intermediate_size=cfg.moe.d_ff,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.router.k,
            norm_topk_prob=cfg.moe.router.normalize,
            **common.sparse_layout_fields(cfg),
            use_sliding_window=False,
        )
        if qwen2:
            out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.moe.shared_width)
        else:
            out.update(attention_bias=cfg.qkv_bias)
        return out

    def matches(self, cfg):
        if not common.softmax_top_k(cfg):
            return False
        if cfg.qk_norm:  # Qwen3-MoE
            return cfg.qk_norm_scope == "head" and cfg.moe.shared_width == 0
        return cfg.moe.shared_width == 0 or cfg.moe.shared_gate  # Qwen2-MoE

    def rules(self, cfg, ckpt):
        d = cfg.d_model

        def moe_rules(i):
            out = common.routed_moe_rules(cfg, i)
            if cfg.moe.shared_width:
                hf = f"model.layers.{i}.mlp"
                shared = common.layer_path(i, "moe", "shared")
                out += common.dense_mlp_rules(
                    cfg, shared, f"{hf}.shared_expert", cfg.moe.shared_width
                )
                gate = common.layer_path(i, "moe", "shared_gate", "kernel")
                out.append(rules.linear(gate, f"{hf}.shared_expert_gate.weight", (d, 1)))
            return out

        return common.decoder_rules(cfg, moe_rules)
