"""`ModelConfig`: the decoder-only transformer's schema, defaults and checks."""

from __future__ import annotations

import dataclasses

from jmoe.lm.mla import MLAConfig
from jmoe.lm.rope import YarnScaling
from jmoe.moe.config import MoEConfig
from jmoe.validation import DTYPES
from jmoe.validation import check as _check
from jmoe.validation import check_choice as _check_choice

REMAT_POLICIES = ("none", "full", "dots")
QK_NORM_SCOPES = ("head", "projection")
LAYER_TYPES = ("full_attention", "sliding_attention")
ATTENTION_IMPLS = ("auto", "plain", "dot_product")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer LM with MoE feed-forward layers.

    Layer `i` (0-based) is a MoE layer when `i >= first_dense_layers` and
    `(i - first_dense_layers) % moe_every == 0`; the other layers use a dense SwiGLU FFN of
    width `d_ff`. `moe.d_model` is always `d_model` (it is set here, whatever `moe` says).

    Attributes:
      vocab_size: V.
      d_model: width D.
      n_layers: transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention); None means `n_heads`.
      head_dim: per-head width; None means `d_model // n_heads`.
      d_ff: hidden width of the dense FFN layers.
      max_seq_len: longest sequence (RoPE table and KV cache size).
      rope_theta: RoPE base.
      rope_scaling: YaRN context extension of the RoPE (`jmoe.lm.rope.YarnScaling`), or None.
      mla: multi-head latent attention (`jmoe.lm.mla.MLAConfig`, DeepSeek-V2/V3) in every layer
        instead of grouped-query attention; `n_kv_heads`, `head_dim`, `qk_norm` and `qkv_bias`
        then do not apply.
      qk_norm: RMSNorm on queries and keys (before RoPE).
      qk_norm_scope: "head" normalises each head (Qwen3; scales `[A]`), "projection" the whole
        query / key projection (OLMoE; scales `[H, A]` / `[G, A]`).
      qkv_bias: bias on the q/k/v projections (Qwen2).
      o_bias: bias on the attention output projection (GPT-OSS).
      attention_sinks: one learned sink logit per query head (GPT-OSS): an extra softmax
        logit that takes probability mass but carries no value.
      sliding_window: W; a "sliding_attention" layer lets position p see keys p-W+1..p.
      layer_types: one entry per layer, "full_attention" or "sliding_attention"; None makes
        every layer full (`sliding_window` then has no effect).
      attention_impl: "auto" (`jax.nn.dot_product_attention` where it fits, the plain path for
        sinks and cached decode), "plain" or "dot_product" (see `jmoe.lm.attention`).
      tie_embeddings: output projection = embedding transposed.
      norm_eps: RMSNorm epsilon.
      first_dense_layers: leading layers with a dense FFN (DeepSeek `first_k_dense_replace`).
      moe_every: MoE in every `moe_every`-th layer after those; 0 makes every layer dense.
      moe: the MoE layer config (`jmoe.MoEConfig`).
      scan_layers: `nn.scan` over identical layers (faster compiles for deep models).
      remat: rematerialisation of each block: "none", "full" or "dots" (save matmul outputs).
      dtype, param_dtype: compute and parameter dtypes (attention softmax and norms in float32).
      init_from: a Hugging Face checkpoint directory a training run starts from; the fields that
        shape the weights then come from its config.json (`jmoe.train.init_from`).
    """

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qkv_bias: bool = False
    o_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attention_impl: str = "auto"
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    first_dense_layers: int = 0
    moe_every: int = 1
    moe: MoEConfig = MoEConfig(d_model=128, d_ff=256)
    scan_layers: bool = False
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_scaling: YarnScaling | None = None
    mla: MLAConfig | None = None
    init_from: str | None = None

    def __post_init__(self):
        owner = "ModelConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            _check(name, value, value >= 1, "an integer >= 1", owner)
        _check(
            "n_kv_heads",
            self.n_kv_heads,
            self.n_kv_heads is None
            or (self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0),
            f"None or a divisor of n_heads={self.n_heads}",
            owner,
        )
        _check(
            "head_dim",
            self.head_dim,
            self.head_dim is not None or self.mla is not None or self.d_model % self.n_heads == 0,
            f"set explicitly when d_model={self.d_model} is not a multiple of "
            f"n_heads={self.n_heads}",
            owner,
        )
        _check(
            "head_dim",
            self.head_dim,
            self.head_dim is None or (self.head_dim >= 2 and self.head_dim % 2 == 0),
            "None or an even integer >= 2 (RoPE rotates pairs)",
            owner,
        )
        for name in ("qk_norm", "qkv_bias"):
            value = getattr(self, name)
            _check(
                name,
                value,
                self.mla is None or not value,
                "False with mla (multi-head latent attention normalises its latents instead)",
                owner,
            )
        _check("rope_theta", self.rope_theta, self.rope_theta > 0, "a number > 0", owner)
        _check("norm_eps", self.norm_eps, self.norm_eps > 0, "a number > 0", owner)
        for name in ("first_dense_layers", "moe_every"):
            value = getattr(self, name)
            _check(name, value, value >= 0, "an integer >= 0", owner)
        self._check_attention(owner)
        _check_choice("remat", self.remat, REMAT_POLICIES, owner)
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES, owner)
        _check_choice("dtype", self.dtype, DTYPES, owner)
        _check_choice("param_dtype", self.param_dtype, DTYPES, owner)
        for name, kind in (("rope_scaling", YarnScaling), ("mla", MLAConfig)):
            value = getattr(self, name)
            _check(
                name,
                value,
                value is None or isinstance(value, kind),
                f"None or a {kind.__name__}",
                owner,
            )
        _check(
            "init_from",
            self.init_from,
            self.init_from is None or bool(str(self.init_from).strip()),
            "None or a Hugging Face checkpoint directory",
            owner,
        )
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"ModelConfig.moe must be a MoEConfig, got {type(self.moe)}")
        if self.moe.d_model != self.d_model:
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, d_model=self.d_model))

    def _check_attention(self, owner: str) -> None:
        _check(
            "sliding_window",
            self.sliding_window,
            self.sliding_window is None or self.sliding_window >= 1,
            "None or an integer >= 1",
            owner,
        )
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS, owner)
        _check(
            "attention_impl",
            self.attention_impl,
            not (self.attention_sinks and self.attention_impl == "dot_product"),
            "'auto' or 'plain' with attention_sinks (jax.nn.dot_product_attention has no sink "
            "logits)",
            owner,
        )
        for name, off in (
            ("attention_sinks", not self.attention_sinks),
            ("o_bias", not self.o_bias),
            ("layer_types", self.layer_types is None),
            ("attention_impl", self.attention_impl != "dot_product"),
        ):
            _check(
                name,
                getattr(self, name),
                self.mla is None or off,
                "left at its default with mla (multi-head latent attention has no sinks, output "
                "bias or sliding layers, and runs the plain path)",
                owner,
            )
        if self.layer_types is None:
            return
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # YAML gives a list
        _check(
            "layer_types",
            self.layer_types,
            len(self.layer_types) == self.n_layers
            and all(t in LAYER_TYPES for t in self.layer_types),
            f"None or n_layers={self.n_layers} entries, each one of {LAYER_TYPES}",
            owner,
        )
        _check(
            "sliding_window",
            self.sliding_window,
            self.sliding_window is not None or "sliding_attention" not in self.layer_types,
            "set (an integer >= 1) when layer_types has a 'sliding_attention' layer",
            owner,
        )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based), None for full attention."""
        if self.layer_types is None or self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a MoE FFN."""
        offset = layer - self.first_dense_layers
        return self.moe_every > 0 and offset >= 0 and offset % self.moe_every == 0
