"""DeepSeek-V3: multi-head latent attention (optionally YaRN), leading dense layers, then MoE
layers with sigmoid scores, a selection bias (`e_score_correction_bias`, the router's
`moe_state/bias`), group-limited selection (a group scores the sum of its two best biased
scores), a routed scaling factor and shared experts.

Interleaved RoPE checkpoints (`rope_interleave`) are converted by reordering the rotated output
features of the query and `kv_a` projections into the rotate-half layout. The multi-token-
prediction layers (index >= `num_hidden_layers`) are skipped. FP8 block-scaled weights are
dequantised by the reader.
"""

from __future__ import annotations

import numpy as np

from jmoe.convert import rules
from jmoe.convert.errors import CheckpointError
from jmoe.convert.families import common
from jmoe.convert.families.base import Family
from jmoe.lm.config import ModelConfig
from jmoe.lm.mla import MLAConfig
from jmoe.lm.rope import interleaved_to_half_permutation
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK

LATENT_NORM_EPS = 1e-6  # HF's latent RMSNorms (q_a, kv_a) always use the default epsilon


class DeepseekV3(Family):
    model_types = ("deepseek_v3",)

    def model_config(self, hf, dtype):
        common.check_silu(hf)
        hf.require("attention_bias", (False,), False, "MLA projections have no biases")
        hf.require("pretraining_tp", (1,), 1)
        hf.require("moe_layer_freq", (1,), 1)
        hf.require("scoring_func", ("sigmoid",), "sigmoid")
        hf.require("topk_method", ("noaux_tc",), "noaux_tc")
        for benign in ("num_nextn_predict_layers", "num_mtp_layers", "ep_size", "aux_loss_alpha"):
            hf.get(benign)  # multi-token prediction and training-only settings
        hf.get("seq_aux")
        hf.get("head_dim")  # qk_rope_head_dim, for RoPE tables
        hf.get("qk_head_dim")
        hf.get("rope_interleave")
        hf.get("num_key_value_heads")  # MLA has one latent for all heads
        eps = hf.get("rms_norm_eps", 1e-6)
        if eps != LATENT_NORM_EPS:
            raise CheckpointError(
                f"{hf.source}: unsupported rms_norm_eps={eps}: MLA's latent norms use "
                f"{LATENT_NORM_EPS} in DeepSeek-V3 and rms_norm_eps in jmoe, so they must agree"
            )
        theta, scaling = common.rope_settings(hf, yarn=True)
        mla = MLAConfig(
            kv_lora_rank=hf.get("kv_lora_rank"),
            qk_nope_head_dim=hf.get("qk_nope_head_dim"),
            qk_rope_head_dim=hf.get("qk_rope_head_dim"),
            v_head_dim=hf.get("v_head_dim"),
            q_lora_rank=hf.get("q_lora_rank"),
        )
        router = TopK(
            k=hf.get("num_experts_per_tok"),
            n_groups=hf.get("n_group"),
            top_groups=hf.get("topk_group"),
            group_score="top2_sum",
            score="sigmoid",
            normalize=bool(hf.get("norm_topk_prob", True)),
            renorm_when_k1=True,
            scale=float(hf.get("routed_scaling_factor", 1.0)),
        )
        moe = MoEConfig(
            d_ff=hf.get("moe_intermediate_size"),
            num_experts=hf.get("n_routed_experts") or hf.get("num_local_experts"),
            num_shared=hf.get("n_shared_experts", 0),
            router=router,
        )
        d_model, n_heads = hf.get("hidden_size"), hf.get("num_attention_heads")
        return ModelConfig(
            vocab_size=hf.get("vocab_size"),
            d_model=d_model,
            n_layers=hf.get("num_hidden_layers"),
            n_heads=n_heads,
            head_dim=None if d_model % n_heads == 0 else mla.qk_head_dim,
            d_ff=hf.get("intermediate_size"),
            max_seq_len=hf.get("max_position_embeddings"),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=eps,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            first_dense_layers=hf.get("first_k_dense_replace", 0),
            mla=mla,
            moe=moe,
            dtype=dtype,
            param_dtype=dtype,
        )

    def hf_config(self, cfg):
        mla, moe, router = cfg.mla, cfg.moe, cfg.moe.router
        return dict(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len,
            rope_parameters=common.yarn_fields(cfg.rope_scaling, cfg.rope_theta),
            rope_interleave=False,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            hidden_act="silu",
            dtype=cfg.param_dtype,
            kv_lora_rank=mla.kv_lora_rank,
            q_lora_rank=mla.q_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
            head_dim=mla.qk_rope_head_dim,
            first_k_dense_replace=cfg.first_dense_layers,
            moe_intermediate_size=moe.d_ff,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared,
            num_experts_per_tok=router.k,
            n_group=router.n_groups,
            topk_group=router.top_groups,
            norm_topk_prob=router.normalize,
            routed_scaling_factor=router.scale,
            num_nextn_predict_layers=0,
        )

    def matches(self, cfg):
        router = cfg.moe.router
        return (
            cfg.mla is not None
            and isinstance(router, TopK)
            and router.score == "sigmoid"
            and router.n_groups is not None
            and router.group_score == "top2_sum"
            and cfg.moe_every == 1
            and cfg.moe.shared_width == cfg.moe.num_shared * cfg.moe.d_ff
            and cfg.moe.activation == "swiglu"
        )

    def skipped(self, cfg, ckpt):
        # Multi-token-prediction layers follow the last decoder layer.
        return [name for name in ckpt.weight_map if _mtp(name, cfg.n_layers)]

    def rules(self, cfg, ckpt):
        interleaved = ckpt is not None and bool(ckpt.config.get("rope_interleave", True))
        return common.decoder_rules(
            cfg,
            lambda i: self._moe_rules(cfg, i),
            attention=lambda i: self._mla_rules(cfg, i, interleaved),
        )

    def _mla_rules(self, cfg, i, interleaved):
        mla, d, h = cfg.mla, cfg.d_model, cfg.n_heads
        r, n, p = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim
        w, q = mla.v_head_dim, mla.qk_head_dim
        perm = interleaved_to_half_permutation(p) if interleaved else np.arange(p)
        # 2. Only the last p features of each query head, and of kv_a, are rotated.
        q_perm = np.concatenate([np.arange(n), n + perm])
        kv_perm = np.concatenate([np.arange(r), r + perm])
        hf = f"model.layers.{i}.self_attn"

        def path(*names):
            return common.layer_path(i, "attn", *names)

        out = []
        if mla.q_lora_rank is None:
            q_proj = rules.linear(path("q", "kernel"), f"{hf}.q_proj.weight", (d, h, q), 1, q_perm)
            out.append(q_proj)
        else:
            lq = mla.q_lora_rank
            out += [
                rules.linear(path("q_a", "kernel"), f"{hf}.q_a_proj.weight", (d, lq)),
                rules.copy(path("q_a_norm", "scale"), f"{hf}.q_a_layernorm.weight", (lq,)),
                rules.linear(path("q_b", "kernel"), f"{hf}.q_b_proj.weight", (lq, h, q), 1, q_perm),
            ]
        kv_a = f"{hf}.kv_a_proj_with_mqa.weight"
        out += [
            rules.linear(path("kv_a", "kernel"), kv_a, (d, r + p), 1, kv_perm),
            rules.copy(path("kv_a_norm", "scale"), f"{hf}.kv_a_layernorm.weight", (r,)),
            rules.linear(path("kv_b", "kernel"), f"{hf}.kv_b_proj.weight", (r, h, n + w)),
            rules.linear(path("o", "kernel"), f"{hf}.o_proj.weight", (h, w, d), 2),
        ]
        return out

    def _moe_rules(self, cfg, i):
        e, hf = cfg.moe.num_experts, f"model.layers.{i}.mlp"
        bias = common.layer_path(i, "moe", "bias", collection="moe_state")
        shared = common.layer_path(i, "moe", "shared")
        return [
            *common.routed_moe_rules(cfg, i),
            rules.copy(bias, f"{hf}.gate.e_score_correction_bias", (e,)),
            *common.dense_mlp_rules(cfg, shared, f"{hf}.shared_experts", cfg.moe.shared_width),
        ]


def _mtp(name: str, n_layers: int) -> bool:
    return name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers
