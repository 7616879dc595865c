"""Decoder-only transformer LM with MoE feed-forward layers (Flax Linen).

Training / eval forward (logits float32; with packed documents, `segment_ids_BxS` keeps each
token inside its document and restarts positions there):

    logits_BxSxV, stats = Transformer(cfg).apply(
        variables, tokens_BxS, deterministic=False, token_mask_BxS=mask,
        segment_ids_BxS=segments, rngs={"jitter": key})

Incremental decoding with an explicit KV cache (`init_cache`): a prefill of the prompt and then
one token at a time give the same logits as the full forward (for dropless MoE layers). Each row
carries its own positions, so a serving batch may hold sequences at different positions:

    cache = init_cache(cfg, batch_size, max_len)
    logits_BxSxV, cache = Transformer(cfg).apply(
        variables, tokens_BxS, positions_BxS, cache, method=Transformer.decode)

A row at position p attends to cache entries 0..p; entries past a row's prompt (say, from a
right-padded prefill) are overwritten before they become visible.

Blocks are pre-norm: `x += attn(attn_norm(x))`, then `x += ffn(ffn_norm(x))` where the FFN is
`jmoe.MoE` in the layers `config.is_moe_layer(i)` selects and a dense SwiGLU elsewhere (a
"coe" chain-of-experts MoE returns the new stream itself). The residual stream, norms, softmax
and logits are float32; matmuls run in `config.dtype`.

Parameters: `embed/embedding` `[V, D]`, `layers_{i}/{attn_norm,attn,ffn_norm}` and
`layers_{i}/mlp` (dense) or `layers_{i}/moe` (exactly `jmoe.MoE`'s tree), `final_norm/scale`,
and `lm_head/kernel` `[D, V]` unless embeddings are tied. With `scan_layers` each run of
identical layer units is one `nn.scan` named `stacks_{j}` whose blocks `block_{u}` carry a
leading repeat axis; `jmoe.lm.param_layout.stack_layers` / `unstack_layers` convert between the two
layouts.
The "moe_state" collection (one entry per MoE layer) follows the same layout.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.lm.attention import Attention, segment_positions
from jmoe.lm.config import ModelConfig
from jmoe.lm.mla import MLA
from jmoe.lm.param_layout import LayerKind, layer_locations, layer_segments, moe_layers
from jmoe.moe.layer import MoE, SharedMLP, update_state

REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class Block(nn.Module):
    """Pre-norm transformer block; `moe` picks a `jmoe.MoE` or a dense SwiGLU FFN.

    Call: `x_BxSxD, (stats, cache) = block(x_BxSxD, cache, positions_BxS, token_mask_BxS,
    deterministic, segment_ids_BxS)`, with the float32 residual stream `x`, this layer's KV cache
    or None, and the MoE stats (`{}` for a dense block). `window` is this layer's sliding
    window (None: full attention).

    The call is `attend` then `feed_forward`; the offloaded serving steps run them apart.
    """

    config: ModelConfig
    moe: bool
    mesh: jax.sharding.Mesh | None = None
    window: int | None = None

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = functools.partial(
            nn.RMSNorm, cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype
        )
        if cfg.mla is not None:
            self.attn = MLA(
                cfg.mla,
                cfg.n_heads,
                cfg.rope_theta,
                cfg.rope_scaling,
                cfg.norm_eps,
                dtype,
                param_dtype,
            )
        else:
            self.attn = Attention(
                cfg.n_heads,
                cfg.kv_heads,
                cfg.dim_per_head,
                cfg.rope_theta,
                cfg.qk_norm,
                cfg.qkv_bias,
                cfg.norm_eps,
                dtype,
                param_dtype,
                qk_norm_scope=cfg.qk_norm_scope,
                rope_scaling=cfg.rope_scaling,
                o_bias=cfg.o_bias,
                attention_sinks=cfg.attention_sinks,
                sliding_window=self.window,
                attention_impl=cfg.attention_impl,
            )
        self.attn_norm = norm()
        self.ffn_norm = norm()
        if self.moe:
            moe_cfg = dataclasses.replace(cfg.moe, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            self.ffn = MoE(moe_cfg, self.mesh, name="moe")
        else:
            self.ffn = SharedMLP(cfg.d_ff, "swiglu", dtype, param_dtype, name="mlp")

    def __call__(
        self, x_BxSxD, cache, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS=None
    ):
        x_BxSxD, cache = self.attend(x_BxSxD, cache, positions_BxS, segment_ids_BxS)
        x_BxSxD, stats = self.feed_forward(x_BxSxD, token_mask_BxS, deterministic)
        return x_BxSxD, (stats, cache)

    def attend(self, x_BxSxD, cache, positions_BxS, segment_ids_BxS=None):
        """The attention half: `(x + attn(attn_norm(x)), cache)`."""
        a_BxSxD, cache = self.attn(self.attn_norm(x_BxSxD), positions_BxS, cache, segment_ids_BxS)
        return x_BxSxD + a_BxSxD.astype(jnp.float32), cache

    def feed_forward(self, x_BxSxD, token_mask_BxS, deterministic):
        """The FFN half: `(new x, MoE stats or {})`."""
        h_BxSxD = self.ffn_norm(x_BxSxD)
        if not self.moe:
            return self.ffn_residual(x_BxSxD, self.ffn(h_BxSxD)), {}
        y_BxSxD, stats = self.ffn(h_BxSxD, deterministic=deterministic, token_mask=token_mask_BxS)
        return self.ffn_residual(x_BxSxD, y_BxSxD), stats

    def ffn_residual(self, x_BxSxD, y_BxSxD):
        """The stream after an FFN output `y`: `x + y`, or `y` itself for a "coe" chain MoE
        (which returns the new stream)."""
        y_BxSxD = y_BxSxD.astype(jnp.float32)
        replaces = self.moe and self.config.moe.chain_residual == "coe"
        return y_BxSxD if replaces else x_BxSxD + y_BxSxD


class Unit(nn.Module):
    """Consecutive blocks `block_{u}` (the body of one scan step); caches are `[U, ...]`.

    `kinds[u]` is block u's `LayerKind`; the stats of the unit's MoE blocks are stacked
    `[U_moe, ...]` in block order.
    """

    config: ModelConfig
    kinds: tuple[LayerKind, ...]
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(
        self, x_BxSxD, cache, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS
    ):
        block_cls = _block_class(self.config)
        stats, caches = [], []
        for u, kind in enumerate(self.kinds):
            layer_cache = None if cache is None else jax.tree.map(lambda c, u=u: c[u], cache)
            x_BxSxD, (layer_stats, layer_cache) = block_cls(
                self.config, kind.moe, self.mesh, kind.window, name=f"block_{u}"
            )(x_BxSxD, layer_cache, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS)
            if layer_stats:
                stats.append(layer_stats)
            caches.append(layer_cache)
        stats = jax.tree.map(lambda *s: jnp.stack(s), *stats) if stats else {}
        cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        return x_BxSxD, (stats, cache)


def _block_class(config: ModelConfig):
    if config.remat == "none":
        return Block
    return nn.remat(
        Block,
        policy=REMAT_POLICIES[config.remat],
        prevent_cse=not config.scan_layers,
        static_argnums=(5,),  # deterministic (self is argument 0)
    )


class Transformer(nn.Module):
    """Decoder-only transformer LM with MoE FFNs (see the module docstring).

    Attributes:
      config: the `ModelConfig`; the MoE layers run in its `dtype` / `param_dtype`.
      mesh: optional `jax.sharding.Mesh`, passed on to every `jmoe.MoE`.

    Example:
      >>> cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
      ...                   moe=MoEConfig(d_ff=32, num_experts=4))
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> variables = Transformer(cfg).init(jax.random.key(0), tokens)
      >>> logits, stats = Transformer(cfg).apply(variables, tokens)
    """

    config: ModelConfig
    mesh: jax.sharding.Mesh | None = None

    def setup(self):
        cfg = self.config
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.initializers.normal(cfg.d_model**-0.5),
            param_dtype=param_dtype,
        )
        if cfg.scan_layers:
            self.stacks = [
                nn.scan(
                    Unit,
                    variable_axes={"params": 0, "moe_state": 0},
                    split_rngs={"params": True, "jitter": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=repeats,
                )(cfg, unit, self.mesh)
                for _, repeats, unit in layer_segments(cfg)
            ]
        else:
            self.layers = [
                _block_class(cfg)(cfg, cfg.is_moe_layer(i), self.mesh, cfg.layer_window(i))
                for i in range(cfg.n_layers)
            ]
        self.final_norm = nn.RMSNorm(cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=param_dtype,
                dot_general=functools.partial(
                    jax.lax.dot_general, preferred_element_type=jnp.float32
                ),
            )

    def __call__(
        self,
        tokens_BxS: jax.Array,
        *,
        deterministic: bool = True,
        token_mask_BxS: jax.Array | None = None,
        positions_BxS: jax.Array | None = None,
        segment_ids_BxS: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits `[B, S, V]` float32 and the model stats (see `aggregate_stats`).

        Args:
          tokens_BxS: int token ids.
          deterministic: False for training (router jitter on; "jitter" rng needed if set).
          token_mask_BxS: bool, False for padding (left out of the MoE losses and loads).
          positions_BxS: RoPE positions (default `0..S-1` in every row, or with segment ids
            the offset of each token in its segment).
          segment_ids_BxS: int document id of each token (packed training): a token attends
            only to earlier tokens with the same id. Positions restart at 0 wherever the id
            changes, so a packed window computes each document exactly as if it were alone
            (a window that begins mid-document starts that document's piece at 0 as well).
        """
        if tokens_BxS.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BxS.shape[1]} > max_seq_len={self.config.max_seq_len}: "
                "raise model.max_seq_len or shorten the sequences"
            )
        if positions_BxS is None and segment_ids_BxS is not None:
            positions_BxS = segment_positions(segment_ids_BxS)
        elif positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
        x_BxSxD, stats, _ = self._blocks(
            tokens_BxS, None, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS
        )
        return self._logits(x_BxSxD), aggregate_stats(self.config, stats)

    def decode(
        self,
        tokens_BxS: jax.Array,
        positions_BxS: jax.Array,
        cache: dict[str, jax.Array],
        token_mask_BxS: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Prefill or decode step: logits `[B, S, V]` float32 and the updated cache.

        Args:
          tokens_BxS: new tokens (a prompt, or one token per row).
          positions_BxS: their absolute positions (per row; may differ between rows), each
            below the cache length M (writes past it are dropped).
          cache: from `init_cache` or the previous call; with unrolled layers (`scan_layers`
            False) also a tuple of per-layer `[B, M, G, A]` arrays per name, returned as such
            (no stacked copy of the whole cache per call).
          token_mask_BxS: optional bool, False for padding tokens.
        """
        x_BxSxD, _, cache = self._blocks(
            tokens_BxS, cache, positions_BxS, token_mask_BxS, True, None
        )
        return self._logits(x_BxSxD), cache

    def _blocks(
        self, tokens_BxS, cache, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS
    ):
        """Embeds and runs every block; returns (x, per-MoE-layer stats list, cache)."""
        x_BxSxD = self.embed(tokens_BxS).astype(jnp.float32)
        stats, caches = [], []
        if self.config.scan_layers:
            for stack, (first, repeats, unit) in zip(
                self.stacks, layer_segments(self.config), strict=True
            ):
                seg = None
                if cache is not None:
                    seg = jax.tree.map(
                        functools.partial(_segment_of, first=first, shape=(repeats, len(unit))),
                        cache,
                    )
                x_BxSxD, (seg_stats, seg) = stack(
                    x_BxSxD, seg, positions_BxS, token_mask_BxS, deterministic, segment_ids_BxS
                )
                if seg_stats:  # [repeats, U_moe, ...] -> layer order [repeats * U_moe, ...]
                    stats.append(jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), seg_stats))
                if seg is not None:
                    caches.append(jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), seg))
        else:
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else {k: c[i] for k, c in cache.items()}
                x_BxSxD, (layer_stats, layer_cache) = layer(
                    x_BxSxD,
                    layer_cache,
                    positions_BxS,
                    token_mask_BxS,
                    deterministic,
                    segment_ids_BxS,
                )
                if layer_stats:
                    stats.append(jax.tree.map(lambda s: s[None], layer_stats))
                caches.append(layer_cache)
        if cache is not None and isinstance(next(iter(cache.values())), tuple):  # per-layer arrays
            cache = {k: tuple(c[k] for c in caches) for k in cache}
        elif cache is not None:
            cache = jax.tree.map(
                lambda *c: jnp.concatenate(c) if self.config.scan_layers else jnp.stack(c),
                *caches,
            )
        return x_BxSxD, stats, cache

    def _logits(self, x_BxSxD):
        x_BxSxD = self.final_norm(x_BxSxD).astype(jnp.dtype(self.config.dtype))
        if self.config.tie_embeddings:
            embedding_VxD = self.embed.embedding.astype(x_BxSxD.dtype)
            return jnp.einsum(
                "bsd,vd->bsv", x_BxSxD, embedding_VxD, preferred_element_type=jnp.float32
            )
        return self.lm_head(x_BxSxD)


def _segment_of(cache_LxBxMxGxA, first: int, shape: tuple[int, int]) -> jax.Array:
    """The cache rows of a scanned segment, `[repeats, unit, B, M, G, A]`."""
    last = first + shape[0] * shape[1]
    return cache_LxBxMxGxA[first:last].reshape(*shape, *cache_LxBxMxGxA.shape[1:])


def aggregate_stats(config: ModelConfig, per_layer: list[dict]) -> dict[str, jax.Array]:
    """Model stats from the MoE layers' stats (each array with a leading layer axis).

    Returns float32: `aux_loss` (sum of the layers' coefficient-weighted losses);
    `load_balance_loss`, `z_loss`, `entropy`, `seq_balance_loss` (means over MoE layers); per
    MoE layer `tokens_per_expert` `[L_moe, E]` (`[L_moe, C, E]` for chains), `active_experts`,
    `dropped_fraction`, `router_entropy` `[L_moe]`, `active_experts_hist` `[L_moe, K*C + 1]`;
    and `expert_flops_per_token`, the realised expert forward FLOPs summed over layers.
    All zeros (with `L_moe = 0`) for a model without MoE layers.
    """
    moe = config.moe
    if per_layer:
        layers = {k: jnp.concatenate([s[k] for s in per_layer]) for k in per_layer[0]}
    else:
        load_shape = (
            (moe.num_experts,) if moe.chain_steps == 1 else (moe.chain_steps, moe.num_experts)
        )
        shapes = {
            "tokens_per_expert": load_shape,
            "active_experts_hist": (moe.slots * moe.chain_steps + 1,),
        }
        keys = ("aux_loss", "load_balance_loss", "z_loss", "entropy", "seq_balance_loss")
        keys += ("active_experts", "dropped_fraction", "expert_flops_per_token")
        layers = {k: jnp.zeros((0, *shapes.get(k, ())), jnp.float32) for k in (*keys, *shapes)}

    def mean(v_L):
        return v_L.mean() if v_L.shape[0] else jnp.zeros((), jnp.float32)

    return {
        "aux_loss": layers["aux_loss"].sum(),
        "load_balance_loss": mean(layers["load_balance_loss"]),
        "z_loss": mean(layers["z_loss"]),
        "entropy": mean(layers["entropy"]),
        "seq_balance_loss": mean(layers["seq_balance_loss"]),
        "tokens_per_expert": layers["tokens_per_expert"],
        "active_experts": layers["active_experts"],
        "dropped_fraction": layers["dropped_fraction"],
        "router_entropy": layers["entropy"],
        "active_experts_hist": layers["active_experts_hist"],
        "expert_flops_per_token": layers["expert_flops_per_token"].sum(),
    }


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None
) -> dict[str, jax.Array]:
    """An empty KV cache for `Transformer.decode`, the same for both layer layouts.

    Args:
      config: the model config.
      batch_size: rows B (sequences decoded together).
      max_len: positions M per row (default `config.max_seq_len`).
      dtype: cache dtype (default `config.dtype`).

    Returns:
      `{"k": [L, B, M, G, A], "v": [L, B, M, G, A]}` zeros, or with `config.mla` the compressed
      `{"latent": [L, B, M, kv_lora_rank], "k_rope": [L, B, M, qk_rope_head_dim]}`.
    """
    max_len = config.max_seq_len if max_len is None else max_len
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    if config.mla is not None:
        rows = (config.n_layers, batch_size, max_len)
        return {
            "latent": jnp.zeros((*rows, config.mla.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((*rows, config.mla.qk_rope_head_dim), dtype),
        }
    shape = (config.n_layers, batch_size, max_len, config.kv_heads, config.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def update_moe_state(config: ModelConfig, moe_state: dict, stats: dict[str, jax.Array]) -> dict:
    """The "moe_state" collection after a training step: `jmoe.update_state` on every MoE layer.

    Applies each layer's auxiliary-loss-free bias and compute-budget updates from its row of the
    model stats (`tokens_per_expert`, `active_experts`); call it outside autodiff.

    Args:
      config: the model config.
      moe_state: `variables["moe_state"]` (either layer layout).
      stats: the model stats of the step (global over the batch).
    """
    if not moe_state:  # routers without state variables (top-p or null experts, no budget)
        return moe_state
    locations = layer_locations(config, config.scan_layers)
    state = jax.tree.map(lambda a: a, moe_state)  # a fresh nested dict to write into
    for row, layer in enumerate(moe_layers(config)):
        path, r = locations[layer]
        parent = functools.reduce(lambda t, key: t[key], path, state)
        layer_stats = {k: stats[k][row] for k in ("tokens_per_expert", "active_experts")}
        current = parent["moe"] if r is None else jax.tree.map(lambda a, r=r: a[r], parent["moe"])
        new = update_state(config.moe, current, layer_stats)
        if r is not None:
            new = jax.tree.map(lambda a, n, r=r: a.at[r].set(n), parent["moe"], new)
        parent["moe"] = new
    return state
