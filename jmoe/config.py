"""Typed configuration: the single schema and its defaults.

`MoEConfig` describes one MoE layer. Its defaults are a plain top-2 softmax, Mixtral-style,
dropless MoE with SwiGLU experts. `None` (never `-1`) means "unset". Every field is checked at
construction and a bad value raises a `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing

import jax.numpy as jnp
import yaml

from jmoe.losses import NORMALIZATIONS as LB_NORMALIZATIONS
from jmoe.losses import NULL_BALANCES
from jmoe.ops import ACTIVATIONS as _OPS_ACTIVATIONS
from jmoe.ops import IMPLEMENTATIONS as _OPS_IMPLEMENTATIONS
from jmoe.routing import SCORES, TOP_P_BOUNDARIES

ROUTERS = ("top_k", "null", "top_p", "expert_choice")
ACTIVATIONS = tuple(_OPS_ACTIVATIONS)
IMPLEMENTATIONS = (None, *_OPS_IMPLEMENTATIONS)
CAPACITY_ROUNDINGS = ("ceil", "floor", "round")
DTYPES = ("float32", "bfloat16", "float16")
CHAIN_RESIDUALS = ("prenorm", "coe")
BUDGET_ROUTERS = ("null", "top_p")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    Attributes:
      d_model: model width D.
      d_ff: hidden width F of each routed expert.
      num_experts: routed experts E.
      router: router kind, one of `ROUTERS`.
      top_k: experts per token k.
      score: "softmax" or "sigmoid" router scores.
      normalize: renormalise the k weights (only when k > 1 unless `renorm_when_k1`).
      renorm_when_k1: renormalise a single weight too (HF parity; cuts the router gradient).
      scale: routed scaling factor applied to the weights.
      n_groups, top_groups: DeepSeek-V3 group-limited selection (both or neither).
      num_null: AdaMoE null experts (router "null"); `top_k` then counts null picks too.
      null_balance: load balance of null experts, "grouped" (paper) or "individual".
      top_p: threshold of the "top_p" router, in (0, 1].
      max_k: optional cap on experts per token for "top_p" (default: all experts).
      top_p_boundary: "strict" (cumulative > p, official) or "inclusive" (>= p).
      allow_noncausal: must be True to use "expert_choice", which lets a token's routing depend
        on later tokens (not causal).
      chain_steps: chain-of-experts passes C >= 1, each with its own router; experts shared.
      chain_residual: "prenorm" returns the sum of the C step outputs (to be added to the
        residual stream by the caller; C=1 is the plain MoE); "coe" returns x + that sum, the
        paper's inner-residual form whose output replaces the stream.
      target_active_experts: compute budget: a controller in `moe_state/budget` (null logit
        offset or top-p threshold shift) holds the mean active experts per token at this value.
      budget_rate: step size of the budget controller.
      num_shared: number of always-on shared experts, fused into one MLP.
      d_ff_shared: hidden width of the fused shared MLP (default `num_shared * d_ff`).
      shared_gate: Qwen2-MoE sigmoid gate on the shared expert output.
      activation: expert MLP: "swiglu" (gated), "gelu" or "relu" (two-matrix MLP).
      capacity_factor: None for dropless; else capacity per expert
        `C = rounding(capacity_factor * k * T / E)` (k dropped if not `capacity_includes_k`).
      eval_capacity_factor: capacity factor when `deterministic=True` (default: same).
      capacity_includes_k, capacity_rounding, min_capacity: capacity rule (ALGORITHMS.md §1.4).
      implementation: grouped-matmul implementation (None picks the fastest for the backend).
      lb_coef: load-balance loss coefficient, for the `lb_normalization` named.
      lb_normalization: one of `LB_NORMALIZATIONS` (ALGORITHMS.md §0.1).
      z_loss_coef: router z-loss coefficient.
      seq_balance_coef: DeepSeek-V3 sequence-wise balance loss coefficient.
      entropy_coef: routing-entropy ("dynamic") loss coefficient (top-p paper: 1e-4).
      bias_update_rate: auxiliary-loss-free balancing rate (0 disables the update).
      router_jitter: multiplicative router-input jitter eps (training only; 0 disables).
      dtype: compute dtype of the experts (the router always runs in float32).
      param_dtype: parameter dtype.
    """

    d_model: int = 256
    d_ff: int = 512
    num_experts: int = 8
    router: str = "top_k"
    top_k: int = 2
    score: str = "softmax"
    normalize: bool = True
    renorm_when_k1: bool = False
    scale: float = 1.0
    n_groups: int | None = None
    top_groups: int | None = None
    num_null: int = 0
    null_balance: str = "grouped"
    top_p: float = 0.4
    max_k: int | None = None
    top_p_boundary: str = "strict"
    allow_noncausal: bool = False
    chain_steps: int = 1
    chain_residual: str = "prenorm"
    target_active_experts: float | None = None
    budget_rate: float = 0.01
    num_shared: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    activation: str = "swiglu"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    capacity_includes_k: bool = True
    capacity_rounding: str = "ceil"
    min_capacity: int = 0
    implementation: str | None = None
    lb_coef: float = 0.01
    lb_normalization: str = "per_assignment_over_k"
    z_loss_coef: float = 0.0
    seq_balance_coef: float = 0.0
    entropy_coef: float = 0.0
    bias_update_rate: float = 0.0
    router_jitter: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        _check_choice("router", self.router, ROUTERS)
        _check_choice("score", self.score, SCORES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("lb_normalization", self.lb_normalization, LB_NORMALIZATIONS)
        _check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        _check_choice("capacity_rounding", self.capacity_rounding, CAPACITY_ROUNDINGS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("null_balance", self.null_balance, NULL_BALANCES)
        _check_choice("top_p_boundary", self.top_p_boundary, TOP_P_BOUNDARIES)
        _check_choice("chain_residual", self.chain_residual, CHAIN_RESIDUALS)
        self._check_adaptive()
        _check(
            "top_k",
            self.top_k,
            self.top_k <= self.num_experts + self.num_null,
            f"at most num_experts + num_null={self.num_experts + self.num_null}",
        )
        self._check_groups()
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _check(name, value, value is None or value > 0, "None (dropless) or a number > 0")
        for name in ("num_shared", "min_capacity"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "an integer >= 0")
        _check(
            "d_ff_shared",
            self.d_ff_shared,
            self.d_ff_shared is None or self.d_ff_shared >= 1,
            "None (num_shared * d_ff) or an integer >= 1",
        )
        _check(
            "shared_gate",
            self.shared_gate,
            not self.shared_gate or self.shared_width > 0,
            "False unless a shared expert exists (num_shared >= 1 or d_ff_shared set)",
        )
        for name in (
            "lb_coef",
            "z_loss_coef",
            "seq_balance_coef",
            "entropy_coef",
            "bias_update_rate",
            "budget_rate",
        ):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0")
        _check("router_jitter", self.router_jitter, 0 <= self.router_jitter < 1, "in [0, 1)")

    def _check_adaptive(self):
        _check("num_null", self.num_null, self.num_null >= 0, "an integer >= 0")
        _check(
            "num_null",
            self.num_null,
            self.num_null == 0 or self.router == "null",
            f"0 unless router='null' (router={self.router!r})",
        )
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        top_k_only = self.router == "top_k"
        _check(
            "score",
            self.score,
            top_k_only or self.score == "softmax",
            f"'softmax' with router={self.router!r} (sigmoid scores are for router='top_k')",
        )
        _check(
            "n_groups",
            self.n_groups,
            top_k_only or self.n_groups is None,
            f"None with router={self.router!r} (group limits are for router='top_k')",
        )
        _check(
            "bias_update_rate",
            self.bias_update_rate,
            top_k_only or self.bias_update_rate == 0,
            f"0 with router={self.router!r} (the selection bias is for router='top_k')",
        )
        _check(
            "max_k",
            self.max_k,
            self.max_k is None or 1 <= self.max_k <= self.num_experts,
            f"None or in [1, num_experts={self.num_experts}]",
        )
        _check("chain_steps", self.chain_steps, self.chain_steps >= 1, "an integer >= 1")
        _check(
            "allow_noncausal",
            self.allow_noncausal,
            self.router != "expert_choice" or self.allow_noncausal,
            "True to use router='expert_choice', which is not causal: a token's experts "
            "depend on later tokens, so a causal LM would see the future",
        )
        if self.target_active_experts is not None:
            _check(
                "target_active_experts",
                self.target_active_experts,
                self.router in BUDGET_ROUTERS,
                f"None unless router is one of {BUDGET_ROUTERS}",
            )
            _check(
                "target_active_experts",
                self.target_active_experts,
                0 < self.target_active_experts <= self.slots * self.chain_steps,
                f"in (0, {self.slots * self.chain_steps}] (slots x chain_steps)",
            )

    @property
    def num_router_outputs(self) -> int:
        """Router logits per token: E true experts plus the null experts."""
        return self.num_experts + self.num_null

    @property
    def slots(self) -> int:
        """Routing slots K per token (and chain step) of the configured router."""
        if self.router == "top_p":
            return self.max_k or self.num_experts
        if self.router == "expert_choice":
            return self.num_experts
        return self.top_k

    def _check_groups(self):
        if self.n_groups is None and self.top_groups is None:
            return
        if self.n_groups is None or self.top_groups is None:
            raise ValueError(
                f"n_groups={self.n_groups} and top_groups={self.top_groups}: group-limited "
                "routing needs both set (or both None)"
            )
        _check(
            "n_groups",
            self.n_groups,
            self.n_groups >= 1 and self.num_experts % self.n_groups == 0,
            f"a divisor of num_experts={self.num_experts}",
        )
        _check(
            "top_groups",
            self.top_groups,
            1 <= self.top_groups <= self.n_groups,
            f"in [1, n_groups={self.n_groups}]",
        )
        eligible = self.top_groups * (self.num_experts // self.n_groups)
        _check(
            "top_k",
            self.top_k,
            self.top_k <= eligible,
            f"at most {eligible} (experts in top_groups={self.top_groups} groups)",
        )

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared expert MLP (0 when there is none)."""
        return self.d_ff_shared if self.d_ff_shared is not None else self.num_shared * self.d_ff

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def _capacity_factor(self, deterministic: bool) -> float | None:
        if deterministic and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def expert_choice_capacity(self, num_tokens: int, deterministic: bool = True) -> int:
        """Tokens each expert takes with router "expert_choice": `round(cf * T / E)` in [1, T],
        where the capacity factor (experts per token on average) defaults to `top_k`."""
        factor = self._capacity_factor(deterministic)
        factor = self.top_k if factor is None else factor
        return min(max(round(factor * num_tokens / self.num_experts), 1), num_tokens)

    def capacity(self, num_tokens: int, deterministic: bool) -> int | None:
        """Slots per expert for `num_tokens` tokens, or None when dropless (token-choice).

        `top_k` is the k of the rule for every token-choice router: the expected experts per
        token (for "top_p", set it to the expected count; for "null" it counts null slots too).
        """
        factor = self._capacity_factor(deterministic)
        if factor is None:
            return None
        k = self.top_k if self.capacity_includes_k else 1
        raw = round(factor * k * num_tokens / self.num_experts, 9)  # 1.1 * 100 / 10 -> 11, not 12
        rounded = {"ceil": math.ceil, "floor": math.floor, "round": round}[self.capacity_rounding]
        return max(int(rounded(raw)), self.min_capacity)


def _check(name: str, value, ok: bool, allowed: str, owner: str = "MoEConfig"):
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: must be {allowed}")


def _check_choice(name: str, value, choices: tuple, owner: str = "MoEConfig"):
    _check(name, value, value in choices, f"one of {choices}", owner)


REMAT_POLICIES = ("none", "full", "dots")
QK_NORM_SCOPES = ("head", "projection")


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
      qk_norm: RMSNorm on queries and keys (before RoPE).
      qk_norm_scope: "head" normalises each head (Qwen3; scales `[A]`), "projection" the whole
        query / key projection (OLMoE; scales `[H, A]` / `[G, A]`).
      qkv_bias: bias on the q/k/v projections (Qwen2).
      tie_embeddings: output projection = embedding transposed.
      norm_eps: RMSNorm epsilon.
      first_dense_layers: leading layers with a dense FFN (DeepSeek `first_k_dense_replace`).
      moe_every: MoE in every `moe_every`-th layer after those; 0 makes every layer dense.
      moe: the MoE layer config (`jmoe.config.MoEConfig`).
      scan_layers: `nn.scan` over identical layers (faster compiles for deep models).
      remat: rematerialisation of each block: "none", "full" or "dots" (save matmul outputs).
      dtype, param_dtype: compute and parameter dtypes (attention softmax and norms in float32).
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
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    first_dense_layers: int = 0
    moe_every: int = 1
    moe: MoEConfig = MoEConfig(d_model=128, d_ff=256)
    scan_layers: bool = False
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

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
            self.head_dim is not None or self.d_model % self.n_heads == 0,
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
        _check("rope_theta", self.rope_theta, self.rope_theta > 0, "a number > 0", owner)
        _check("norm_eps", self.norm_eps, self.norm_eps > 0, "a number > 0", owner)
        for name in ("first_dense_layers", "moe_every"):
            value = getattr(self, name)
            _check(name, value, value >= 0, "an integer >= 0", owner)
        _check_choice("remat", self.remat, REMAT_POLICIES, owner)
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES, owner)
        _check_choice("dtype", self.dtype, DTYPES, owner)
        _check_choice("param_dtype", self.param_dtype, DTYPES, owner)
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"ModelConfig.moe must be a MoEConfig, got {type(self.moe)}")
        if self.moe.d_model != self.d_model:
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, d_model=self.d_model))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a MoE FFN."""
        offset = layer - self.first_dense_layers
        return self.moe_every > 0 and offset >= 0 and offset % self.moe_every == 0


MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over all devices of all processes.

    Each axis is a positive size; at most one may be None, meaning "the devices left over"
    (never -1). The product must equal the device count. Axis order is `MESH_AXES`.
    """

    data: int | None = None
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            _check(
                axis,
                size,
                size is None or size >= 1,
                "None (fill) or an integer >= 1",
                "MeshConfig",
            )
        unset = [axis for axis, size in sizes.items() if size is None]
        if len(unset) > 1:
            raise ValueError(
                f"MeshConfig axes {unset} are all None: at most one axis may be None "
                "(it takes the devices left over)"
            )

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Sizes of `MESH_AXES` for `num_devices` devices, filling the None axis."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        fixed = math.prod(size for size in sizes.values() if size is not None)
        unset = [axis for axis, size in sizes.items() if size is None]
        if unset:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {sizes}: the fixed axes multiply to {fixed}, which does not "
                    f"divide the {num_devices} devices, so {unset[0]!r} cannot fill the rest"
                )
            sizes[unset[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {sizes} multiplies to {fixed} devices but there are "
                f"{num_devices}: change the sizes or set one axis to None to fill the rest"
            )
        return sizes


TOKENIZERS = ("byte", "bpe")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training text, tokenizer and batch shape.

    The model's vocabulary follows the tokenizer: "bpe" trains a byte-level BPE of exactly
    `model.vocab_size` symbols on the training split; "byte" (256 bytes + end-of-text) and a
    user `tokenizer.json` path need `model.vocab_size` >= the tokenizer's size (checked when the
    run starts; the extra rows are never targets).

    Attributes:
      source: "stdlib" (the running interpreter's standard-library `.py` files, no download), or
        a text file, directory, glob or `.jsonl` file with a "text" field.
      max_bytes: read at most this many bytes of the source (None: all of it).
      eval_fraction: fraction of the documents held out for evaluation (deterministic split).
      tokenizer: "byte", "bpe" or a path to a `tokenizer.json` / saved tokenizer directory.
      seq_len: tokens per training sequence (at most `model.max_seq_len`).
      batch_size: global batch in sequences (split evenly over processes).
      seed: split and shuffle seed.
      prefetch: batches prepared ahead by background threads (0 disables).
    """

    source: str = "stdlib"
    max_bytes: int | None = 4_000_000
    eval_fraction: float = 0.02
    tokenizer: str = "bpe"
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    prefetch: int = 2

    def __post_init__(self):
        owner = "DataConfig"
        _check("source", self.source, bool(self.source), "'stdlib' or a path / glob", owner)
        _check(
            "max_bytes",
            self.max_bytes,
            self.max_bytes is None or self.max_bytes >= 1,
            "None (all) or an integer >= 1",
            owner,
        )
        _check("eval_fraction", self.eval_fraction, 0 < self.eval_fraction < 1, "in (0, 1)", owner)
        _check(
            "tokenizer",
            self.tokenizer,
            bool(self.tokenizer),
            f"one of {TOKENIZERS} or a path to a tokenizer.json",
            owner,
        )
        for name in ("seq_len", "batch_size"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1", owner)
        _check("prefetch", self.prefetch, self.prefetch >= 0, "an integer >= 0", owner)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, evaluation, checkpoints and logging.

    Attributes:
      steps: total optimizer steps (a resumed run continues up to this).
      learning_rate: peak learning rate of the warmup + cosine schedule.
      warmup_steps: linear warmup from 0 to `learning_rate`.
      final_lr_fraction: the cosine decays to `learning_rate * final_lr_fraction` at `steps`.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay on matrices (never on norms, biases, router bias).
      grad_clip: clip by global norm (None disables).
      seed: parameter init and per-step RNG seed.
      log_every: steps between metrics.jsonl lines and progress-bar updates.
      eval_every: steps between held-out evaluations (also at the last step).
      eval_batches: held-out batches per evaluation (None: the whole held-out split).
      checkpoint_every: steps between (async) checkpoints (also at the last step).
      max_to_keep: checkpoints kept.
      max_bad_steps: stop after this many non-finite steps in a row (each one is skipped).
      progress: show a progress bar.
      plot: write `report.png` (loss curves, expert-load heatmap) at the end.
    """

    steps: int = 500
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None
    checkpoint_every: int = 100
    max_to_keep: int = 2
    max_bad_steps: int = 10
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        owner = "TrainConfig"
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1", owner)
        for name in ("warmup_steps", "weight_decay", "eps"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0", owner)
        _check("learning_rate", self.learning_rate, self.learning_rate > 0, "a number > 0", owner)
        _check(
            "final_lr_fraction",
            self.final_lr_fraction,
            0 <= self.final_lr_fraction <= 1,
            "in [0, 1]",
            owner,
        )
        for name in ("b1", "b2"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)", owner)
        _check(
            "grad_clip",
            self.grad_clip,
            self.grad_clip is None or self.grad_clip > 0,
            "None (no clipping) or a number > 0",
            owner,
        )
        _check(
            "eval_batches",
            self.eval_batches,
            self.eval_batches is None or self.eval_batches >= 1,
            "None (all) or an integer >= 1",
            owner,
        )
        _check(
            "max_bad_steps", self.max_bad_steps, self.max_bad_steps >= 1, "an integer >= 1", owner
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, data, training and device mesh (`load_config` builds one)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _check(
            "data.seq_len",
            self.data.seq_len,
            self.data.seq_len <= self.model.max_seq_len,
            f"at most model.max_seq_len={self.model.max_seq_len}",
            "Config",
        )


# Keys that may differ between a run and its resumption: they change how long it runs or how it
# reports, not what it computes.
RESUMABLE_KEYS = (  # not train.steps: it is the cosine schedule's length
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_to_keep",
    "train.max_bad_steps",
    "train.progress",
    "train.plot",
)


def load_config(
    path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """The defaults, then the YAML file at `path` (sparse nested overrides), then `overrides`.

    Args:
      path: a YAML file such as `configs/small.yaml`, or None for the defaults (tiny CPU run).
      overrides: `"key.path=value"` strings; values are parsed as YAML (`true`, `1e-3`, `null`).

    Returns:
      The validated `Config`. An unknown key raises a ValueError naming the key, the allowed keys
      at that level and the closest one; a bad value raises the dataclass's ValueError prefixed
      with the full key path.

    Example:
      >>> cfg = load_config("configs/tiny.yaml", ["model.moe.router=top_p", "train.steps=50"])
    """
    tree = config_to_dict(Config())
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config sections, got {loaded!r}")
        _merge(tree, loaded, Config, prefix="")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        try:
            nested: typing.Any = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            nested = text  # not YAML (e.g. a glob like *.txt): the raw text

        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(tree, nested, Config, prefix="")
    return config_from_dict(tree)


def config_to_dict(config) -> dict:
    """The config as nested plain dicts (YAML / JSON safe)."""
    return dataclasses.asdict(config)


def config_from_dict(tree: dict, cls: type = Config, prefix: str = ""):
    """Builds `cls` from a complete nested dict, prefixing validation errors with the key path."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        value = tree[field.name]
        if dataclasses.is_dataclass(hints[field.name]):
            value = config_from_dict(value, hints[field.name], f"{prefix}{field.name}.")
        kwargs[field.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        if prefix and not str(e).startswith(prefix):
            raise ValueError(f"{prefix.rstrip('.')}: {e}") from None
        raise


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (`load_config(path)` reads it back)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)  # readers never see a half-written file


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(a) | set(b))
    diff = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diff.append(f"{prefix}{key}")
    return diff


def _merge(tree: dict, update: dict, cls: type, prefix: str) -> None:
    """Merges `update` into `tree` (the dict of dataclass `cls`), checking keys and value types."""
    if not isinstance(update, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {update!r}")
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in hints:
            allowed = sorted(hints)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {path!r}: allowed keys are {allowed}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            _merge(tree[key], value if value is not None else {}, kind, f"{path}.")
        else:
            tree[key] = _coerce(path, value, kind)


def _coerce(path: str, value, kind):
    """`value` as the annotated type `kind`. YAML reads `1e-3` as text (floats are parsed) and
    `null` as None (a text-only field such as `router` takes it as the text "null")."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    if value is None and str in allowed:
        return "null"
    if float in allowed and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = any(isinstance(value, t) for t in allowed if t is not type(None))
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"config key {path!r}={value!r} is invalid: must be {names}")
    return value
