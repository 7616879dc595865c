"""What the decoder families share: the checked reading of `config.json` and the tensor rules
of the Llama-style skeleton (embedding, attention, norms, dense MLP, output head)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jmoe.convert import rules
from jmoe.convert.errors import CheckpointError
from jmoe.lm.config import ModelConfig
from jmoe.lm.rope import YarnScaling
from jmoe.moe.routers import TopK

# Fields that never change the forward pass: bookkeeping, token ids, training-only knobs.
BENIGN_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "id2label",
        "label2id",
    }
)


class HFConfig:
    """`config.json` read field by field: every field must be taken, checked or benign.

    `check_all_used()` then refuses any field nobody read, since an unknown field may change
    the math (a new RoPE variant, a different activation...).
    """

    def __init__(self, fields: dict, source: str = "config.json"):
        self.fields, self.source, self._used = dict(fields), source, set(BENIGN_FIELDS)

    def get(self, name: str, default=None):
        self._used.add(name)
        value = self.fields.get(name, default)
        return default if value is None else value

    def require(self, name: str, allowed: tuple, default=None, why: str = "") -> object:
        """The field's value, which must be in `allowed` (a missing field counts as `default`)."""
        value = self.get(name, default)
        if value not in allowed:
            raise CheckpointError(
                f"{self.source}: unsupported {name}={value!r}: supported {allowed}"
                + (f" ({why})" if why else "")
            )
        return value

    def check_all_used(self, model_type: str) -> None:
        unknown = sorted(set(self.fields) - self._used)
        if unknown:
            listed = ", ".join(f"{k}={self.fields[k]!r}" for k in unknown)
            raise CheckpointError(
                f"{self.source}: unknown config field(s) for model_type {model_type!r}: {listed}; "
                "they may change the model's math, so the checkpoint is refused"
            )


YARN_FIELDS = tuple(f.name for f in dataclasses.fields(YarnScaling))


def rope_settings(hf: HFConfig, yarn: bool = False) -> tuple[float, YarnScaling | None]:
    """The RoPE base and scaling from `rope_parameters` (transformers 5) or `rope_theta` /
    `rope_scaling` (older files): the default RoPE, or YaRN where the family allows it."""
    params = dict(hf.get("rope_parameters", {}) or {})
    legacy = dict(hf.get("rope_scaling", {}) or {})  # older files; wins over the default
    kinds = [d.get(k) for d in (legacy, params) for k in ("rope_type", "type")]
    rope_type = next((k for k in kinds if k is not None), "default")
    params = {k: v for k, v in {**params, **legacy}.items() if k not in ("rope_type", "type")}
    supported = ("default", "yarn") if yarn else ("default",)
    if rope_type not in supported:
        raise CheckpointError(
            f"{hf.source}: unsupported rope_parameters.rope_type={rope_type!r}: supported "
            f"{supported}"
        )
    theta = params.pop("rope_theta", None)
    theta = float(hf.get("rope_theta", 10000.0) if theta is None else theta)
    scaling = None
    if rope_type == "yarn":
        fields = {k: params.pop(k) for k in YARN_FIELDS if params.get(k) is not None}
        fields.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling = YarnScaling(**fields)
    if params:
        raise CheckpointError(f"{hf.source}: unsupported rope_parameters fields {params}")
    return theta, scaling


def yarn_fields(scaling: YarnScaling | None, theta: float) -> dict:
    """The inverse of `rope_settings`: the `rope_parameters` dict."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    fields = {f: getattr(scaling, f) for f in YARN_FIELDS if getattr(scaling, f) is not None}
    return {"rope_type": "yarn", "rope_theta": theta, **fields}


def softmax_top_k(cfg: ModelConfig) -> bool:
    """Whether the model is what Mixtral, OLMoE and the Qwen MoEs compute: unscaled RoPE,
    grouped-query attention, and MoE layers of a plain softmax top-k over SwiGLU experts (no
    groups, no scaling, one chain step)."""
    router, moe = cfg.moe.router, cfg.moe
    return (
        cfg.rope_scaling is None
        and cfg.mla is None
        and not (cfg.o_bias or cfg.attention_sinks or cfg.sliding_window)
        and not (moe.router_bias or moe.expert_bias)
        and isinstance(router, TopK)
        and router.score == "softmax"
        and router.scale == 1.0
        and router.n_groups is None
        and moe.chain_steps == 1
        and moe.activation == "swiglu"
        and moe.chain_residual == "prenorm"
    )


def check_silu(hf: HFConfig, name: str = "hidden_act") -> None:
    hf.require(name, ("silu",), "silu", "jmoe's SwiGLU uses SiLU")


def llama_fields(hf: HFConfig, yarn: bool = False) -> dict:
    """`ModelConfig` fields every family spells the same way (YaRN RoPE where `yarn`)."""
    theta, scaling = rope_settings(hf, yarn)
    d_model, n_heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    head_dim = hf.get("head_dim")
    return dict(
        vocab_size=hf.get("vocab_size"),
        d_model=d_model,
        n_layers=hf.get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=None if head_dim in (None, d_model // n_heads) else head_dim,
        max_seq_len=hf.get("max_position_embeddings"),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def llama_hf_fields(cfg: ModelConfig) -> dict:
    """The inverse of `llama_fields`."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters=yarn_fields(cfg.rope_scaling, cfg.rope_theta),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        dtype=cfg.param_dtype,
    )


def layer_path(i: int, *names: str, collection: str = "params") -> rules.Path:
    return (collection, f"layers_{i}", *names)


def expert_paths(i: int) -> tuple[rules.Path, ...]:
    """The routed experts' `w_gate, w_up, w_down` of MoE layer `i`."""
    return tuple(layer_path(i, "moe", "experts", w) for w in ("w_gate", "w_up", "w_down"))


def attention_rules(cfg: ModelConfig, i: int) -> list[rules.Rule]:
    """q/k/v/o projections, their biases (`qkv_bias`) and qk-norm scales of layer `i`."""
    d, h, g, a = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    hf = f"model.layers.{i}.self_attn"
    out = [
        rules.linear(layer_path(i, "attn", "q", "kernel"), f"{hf}.q_proj.weight", (d, h, a)),
        rules.linear(layer_path(i, "attn", "k", "kernel"), f"{hf}.k_proj.weight", (d, g, a)),
        rules.linear(layer_path(i, "attn", "v", "kernel"), f"{hf}.v_proj.weight", (d, g, a)),
        rules.linear(layer_path(i, "attn", "o", "kernel"), f"{hf}.o_proj.weight", (h, a, d), 2),
    ]
    if cfg.qkv_bias:
        for n, heads in (("q", h), ("k", g), ("v", g)):
            bias = layer_path(i, "attn", n, "bias")
            out.append(rules.copy(bias, f"{hf}.{n}_proj.bias", (heads * a,), (heads, a)))
    if cfg.o_bias:
        out.append(rules.copy(layer_path(i, "attn", "o", "bias"), f"{hf}.o_proj.bias", (d,)))
    if cfg.attention_sinks:
        out.append(rules.copy(layer_path(i, "attn", "sinks"), f"{hf}.sinks", (h,)))
    if cfg.qk_norm:
        for n, heads in (("q", h), ("k", g)):
            shape = (a,) if cfg.qk_norm_scope == "head" else (heads, a)
            out.append(
                rules.copy(
                    layer_path(i, "attn", f"{n}_norm", "scale"),
                    f"{hf}.{n}_norm.weight",
                    (a,) if cfg.qk_norm_scope == "head" else (heads * a,),
                    shape,
                )
            )
    return out


def dense_mlp_rules(cfg: ModelConfig, path: rules.Path, hf: str, d_ff: int) -> list[rules.Rule]:
    """A SwiGLU MLP (`{hf}.gate_proj / up_proj / down_proj`) as `path/{w_gate,w_up,w_down}`."""
    d = cfg.d_model
    return [
        rules.linear((*path, "w_gate"), f"{hf}.gate_proj.weight", (d, d_ff)),
        rules.linear((*path, "w_up"), f"{hf}.up_proj.weight", (d, d_ff)),
        rules.linear((*path, "w_down"), f"{hf}.down_proj.weight", (d_ff, d)),
    ]


def decoder_rules(
    cfg: ModelConfig,
    moe_rules: Callable[[int], list[rules.Rule]],
    attention: Callable[[int], list[rules.Rule]] | None = None,
) -> list[rules.Rule]:
    """Every rule of a pre-norm decoder whose MoE layers `moe_rules(i)` maps (and attention
    `attention(i)`, default `attention_rules`)."""
    attention = attention or (lambda i: attention_rules(cfg, i))
    d, v = cfg.d_model, cfg.vocab_size
    out = [rules.copy(("params", "embed", "embedding"), "model.embed_tokens.weight", (v, d))]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}"
        out.append(
            rules.copy(layer_path(i, "attn_norm", "scale"), f"{hf}.input_layernorm.weight", (d,))
        )
        out += attention(i)
        out.append(
            rules.copy(
                layer_path(i, "ffn_norm", "scale"), f"{hf}.post_attention_layernorm.weight", (d,)
            )
        )
        if cfg.is_moe_layer(i):
            out += moe_rules(i)
        else:
            out += dense_mlp_rules(cfg, layer_path(i, "mlp"), f"{hf}.mlp", cfg.d_ff)
    out.append(rules.copy(("params", "final_norm", "scale"), "model.norm.weight", (d,)))
    if not cfg.tie_embeddings:
        out.append(rules.linear(("params", "lm_head", "kernel"), "lm_head.weight", (d, v)))
    return out


def routed_moe_rules(cfg: ModelConfig, i: int) -> list[rules.Rule]:
    """Router `mlp.gate.weight` and the routed experts `mlp.experts` of MoE layer `i`."""
    d, e, f = cfg.d_model, cfg.moe.num_experts, cfg.moe.d_ff
    hf = f"model.layers.{i}.mlp"
    router = layer_path(i, "moe", "router", "kernel")
    return [
        rules.linear(router, f"{hf}.gate.weight", (d, e)),
        rules.Experts(expert_paths(i), f"{hf}.experts", e, d, f),
    ]


def sparse_layout(hf: HFConfig, n_layers: int) -> dict:
    """`first_dense_layers` / `moe_every` from Qwen's `decoder_sparse_step` s and
    `mlp_only_layers` (layer i is sparse when `(i + 1) % s == 0` and i is not listed)."""
    step = hf.get("decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers", []) or [])
    sparse = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    first = sparse[0] if sparse else n_layers
    if sparse != list(range(first, n_layers, step)):
        raise CheckpointError(
            f"{hf.source}: unsupported mlp_only_layers={sorted(dense_only)} with "
            f"decoder_sparse_step={step}: the sparse layers {sparse} are not every {step}-th "
            "layer from the first one"
        )
    return dict(first_dense_layers=first, moe_every=step)


def sparse_layout_fields(cfg: ModelConfig) -> dict:
    """The inverse of `sparse_layout`: `decoder_sparse_step` and `mlp_only_layers`."""
    step, first = cfg.moe_every, cfg.first_dense_layers
    # 1. HF's sparse layers are i = s-1, 2s-1, ...; jmoe's first one must be among them.
    if step == 0 or (first + 1) % step:
        raise CheckpointError(
            f"ModelConfig first_dense_layers={first}, moe_every={step} has no Qwen MoE "
            "equivalent: the first MoE layer i must satisfy (i + 1) % moe_every == 0"
        )
    mlp_only = [i for i in range(first) if (i + 1) % step == 0]
    return dict(decoder_sparse_step=step, mlp_only_layers=mlp_only)
