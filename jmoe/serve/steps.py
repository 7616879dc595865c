"""The compiled model steps of the engine: prefill one prompt into a slot, decode the slots.

The KV cache stays on the device as one `[slots, M, G, A]` array per layer and name (with
multi-head latent attention, the latents and rotated keys `[slots, M, R | P]`), so a step writes
its rows in place with no copy of the whole cache, beside the count of each token generated so
far per slot (for the penalties) and each slot's last drawn token; each call donates them and
gets them back updated. A decode step reads its input tokens there, so the host can dispatch
the next step before it has read the last one's tokens (JAX dispatches asynchronously). Shapes are
fixed per prompt bucket, cache length and row count, so after one call of each nothing
recompiles (`compilations` counts every compilation in the process).

- `prefill`: one prompt, right-padded to its bucket length P, runs through
  `Transformer.decode` into a fresh `[L, 1, P, G, A]` cache that is copied into the slot's
  first P positions (the padded tail holds garbage that decoding overwrites before any query
  can see it); the last real position's logits give the first generated token.
- `decode`: each slot's last token at that slot's own position, attending over the first L cache
  positions, L a bucket above every busy slot's position (short contexts read a short cache);
  only the new token's keys and values are written back into the cache. Either every slot
  runs (idle ones too, the shape being fixed, with their tokens masked out of the MoE
  statistics) or, when one request is running, its slot alone.

Both report, per token, the experts each MoE layer ran for it (from the `Routing`s the MoE
layers sow under "intermediates"), averaged over the MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer, init_cache
from jmoe.lm.param_layout import moe_layers
from jmoe.moe.routing import Routing
from jmoe.serve import sampling

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lowerings = {"count": 0, "listening": False}


def _count_lowering(event: str, duration: float, **kwargs) -> None:
    if event == _LOWERING_EVENT:
        _lowerings["count"] += 1


def compilations() -> int:
    """XLA compilations started in this process since the first call of this function (one
    per jitted function and new shape, committed-ness or static argument; a load from the
    persistent compilation cache counts too)."""
    if not _lowerings["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_count_lowering)
        _lowerings["listening"] = True
    return _lowerings["count"]


def _routings(intermediates) -> list[Routing]:
    """Every `Routing` the MoE layers sowed (one per layer and chain step)."""
    leaves = jax.tree.leaves(intermediates, is_leaf=lambda x: isinstance(x, Routing))
    return [leaf for leaf in leaves if isinstance(leaf, Routing)]


class ModelSteps:
    """Jitted prefill and decode over a device-resident KV cache of `num_slots` rows.

    Args:
      config: an unrolled model config (`scan_layers=False`, so the MoE routings can be read).
      variables: `{"params": ..., "moe_state": ...}` in that layout.
      num_slots: decode rows.
      vocab_limit: ids at or above it (model rows the tokenizer never produces) are never
        sampled and get no probability.
    """

    def __init__(self, config: ModelConfig, variables, num_slots: int, vocab_limit: int):
        self.config = config
        self.num_slots = num_slots
        self.vocab_limit = vocab_limit
        self.model = Transformer(config)
        self.num_moe_layers = len(moe_layers(config))
        # Committed to one device from the start: the cache a step returns is committed, and a
        # first call with an uncommitted one would compile a second time.
        device = jax.devices()[0]
        self.variables = jax.device_put(variables, device)
        stacked = init_cache(config, num_slots)
        cache = {name: tuple(c[i] for i in range(config.n_layers)) for name, c in stacked.items()}
        self.cache = jax.device_put(cache, device)
        self.counts = jax.device_put(jnp.zeros((num_slots, config.vocab_size), jnp.int32), device)
        self.tokens = jax.device_put(jnp.zeros(num_slots, jnp.int32), device)  # last drawn
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=1, static_argnums=3)
        self._decode = jax.jit(self._decode_fn, donate_argnums=1, static_argnums=3)

    # ---------------------------------------------------------------------------- host side

    def prefill(
        self, slot: int, prompt: list[int], bucket: int, row: dict, prompt_logprobs: bool
    ) -> dict[str, np.ndarray]:
        """Prefills `prompt` (length <= `bucket`) into `slot` and draws its first token.

        Args:
          slot: the cache row to fill.
          prompt: token ids.
          bucket: the padded length P (one compile per bucket).
          row: the request's sampling arrays (`temperature`, `top_k`, `top_p`, `seed`), scalars.
          prompt_logprobs: also return the prompt tokens' log-probabilities (`echo`).

        Returns:
          NumPy arrays: `token`, `logprob`, `top_ids` `[N]`, `top_logprobs` `[N]`,
          `active_experts` (of the last prompt token), `prompt_active_experts` (mean over the
          prompt) and, when asked, `prompt_logprobs` `[P]`, `prompt_top_ids` /
          `prompt_top_logprobs` `[P, N]` (entry i scores token i given the tokens before it).
        """
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        arrays = {k: np.asarray(v)[None] for k, v in row.items()}
        (self.cache, self.counts, self.tokens), out = self._prefill(
            self.variables,
            (self.cache, self.counts, self.tokens),
            (np.int32(slot), np.int32(len(prompt)), tokens, arrays),
            prompt_logprobs,
        )
        return jax.device_get(out)

    def decode(
        self, positions: np.ndarray, rows: dict, length: int, first: int = 0
    ) -> dict[str, jax.Array]:
        """Dispatches one decode step of the n slots `first .. first + n - 1` (n from the
        arrays' length: every slot, or a single one whose cache row alone is read and written)
        and returns at once, before the step has run: `jax.device_get` its outputs.

        Each slot's input is its last drawn token (by the prefill or the step before); the
        active slots' drawn tokens replace them.

        Args:
          positions: `[n]` int32 position of each slot's last token.
          rows: `[n]` arrays `active` (bool), `temperature`, `top_k`, `top_p`, `seed`,
            `counter` (index of the token being drawn in its request).
          length: attend over the first `length` cache positions only (above every position;
            one compile per length and n, so the caller picks from a few buckets).
          first: the first slot.

        Returns:
          Device arrays `[n]`: `token`, `logprob`, `active_experts`; `[n, N]`: `top_ids`,
          `top_logprobs`; and `experts_read`, the distinct (layer, expert) weight sets the step
          ran (every row counts: idle slots are computed too).
        """
        first = np.int32(first)  # host scalars: a jnp scalar would cost an eager dispatch
        (self.cache, self.counts, self.tokens), out = self._decode(
            self.variables, (self.cache, self.counts, self.tokens), (first, positions, rows), length
        )
        return out

    # -------------------------------------------------------------------------- device side

    def _apply(self, variables, tokens_BxS, positions_BxS, cache, mask_BxS):
        (logits_BxSxV, cache), state = self.model.apply(
            variables,
            tokens_BxS,
            positions_BxS,
            cache,
            mask_BxS,
            method=Transformer.decode,
            mutable=["intermediates"],
        )
        if self.vocab_limit < logits_BxSxV.shape[-1]:
            ids_V = jnp.arange(logits_BxSxV.shape[-1])
            logits_BxSxV = jnp.where(ids_V < self.vocab_limit, logits_BxSxV, -jnp.inf)
        return logits_BxSxV, cache, _routings(state.get("intermediates", {}))

    def _active_experts(self, routings: list[Routing], shape: tuple[int, int]) -> jax.Array:
        """`[B, S]` float32 experts run per token, averaged over the MoE layers."""
        if not routings:
            return jnp.zeros(shape, jnp.float32)
        total = sum(r.valid.sum(-1).reshape(shape) for r in routings)
        return total.astype(jnp.float32) / self.num_moe_layers

    def _next_token(self, logits_BxV, sampled_BxV, rows) -> dict[str, jax.Array]:
        """Draws from `sampled_BxV` (the penalized logits); reports log-probabilities under the
        model's own `logits_BxV`."""
        token_B = sampling.sample(
            sampled_BxV, rows["temperature"], rows["top_k"], rows["top_p"], rows["seed"],
            rows["counter"],
        )  # fmt: skip
        logprob_B, top_ids_BxN, top_logprobs_BxN = sampling.token_logprobs(logits_BxV, token_B)
        return dict(
            token=token_B, logprob=logprob_B, top_ids=top_ids_BxN, top_logprobs=top_logprobs_BxN
        )

    def _prefill_fn(self, variables, state, inputs, prompt_logprobs: bool):
        cache, counts, last_S = state
        slot, length, tokens_1xP, rows = inputs
        p = tokens_1xP.shape[1]
        positions_1xP = jnp.arange(p, dtype=jnp.int32)[None]
        mask_1xP = positions_1xP < length
        fresh = init_cache(self.config, 1, p, jax.tree.leaves(cache)[0].dtype)
        logits_1xPxV, fresh, routings = self._apply(
            variables, tokens_1xP, positions_1xP, fresh, mask_1xP
        )
        cache = {
            name: tuple(
                jax.lax.dynamic_update_slice(c, fresh[name][i], (slot,) + (0,) * (c.ndim - 1))
                for i, c in enumerate(layers)
            )
            for name, layers in cache.items()
        }
        last_1xV = jax.lax.dynamic_index_in_dim(logits_1xPxV[0], length - 1, keepdims=True)
        out = {
            k: v[0]
            for k, v in self._next_token(  # nothing generated yet: no penalty
                last_1xV, last_1xV, {**rows, "counter": jnp.zeros(1, jnp.int32)}
            ).items()
        }
        first_V = jax.nn.one_hot(out["token"], counts.shape[1], dtype=jnp.int32)
        counts = jax.lax.dynamic_update_slice(counts, first_V[None], (slot, 0))
        last_S = jax.lax.dynamic_update_slice(last_S, out["token"][None], (slot,))
        active_P = self._active_experts(routings, (1, p))[0]
        out["active_experts"] = active_P[length - 1]
        out["prompt_active_experts"] = jnp.sum(jnp.where(mask_1xP[0], active_P, 0.0)) / length
        if prompt_logprobs:
            # entry i scores token i with the logits of position i - 1 (entry 0 has none)
            before_PxV = jnp.concatenate([logits_1xPxV[0, :1], logits_1xPxV[0, :-1]])
            lp_P, top_ids_PxN, top_lp_PxN = sampling.token_logprobs(before_PxV, tokens_1xP[0])
            out.update(
                prompt_logprobs=lp_P, prompt_top_ids=top_ids_PxN, prompt_top_logprobs=top_lp_PxN
            )
        return (cache, counts, last_S), out

    def _decode_fn(self, variables, state, inputs, length):
        cache, counts, last_S = state
        first, positions_S, rows = inputs
        s = positions_S.shape[0]
        tokens_S = jax.lax.dynamic_slice(last_S, (first,), (s,))
        # The step reads and writes the cache rows of its slots, positions 0..length-1 only.
        # Every cache array is [slots, M, ...] (keys and values, or MLA's latent and rope key).
        view = {
            name: tuple(
                jax.lax.dynamic_slice(c, (first,) + (0,) * (c.ndim - 1), (s, length, *c.shape[2:]))
                for c in layers
            )
            for name, layers in cache.items()
        }
        logits_Sx1xV, view, routings = self._apply(
            variables, tokens_S[:, None], positions_S[:, None], view, rows["active"][:, None]
        )
        # Only the new entries go back (a scatter into the donated cache, in place): writing the
        # whole view back would make XLA copy the cache to keep the view's reads intact.
        rows_S = jnp.arange(s)
        cache = {
            name: tuple(
                c.at[first + rows_S, positions_S].set(new[rows_S, positions_S])
                for c, new in zip(layers, view[name], strict=True)
            )
            for name, layers in cache.items()
        }
        counts_SxV = jax.lax.dynamic_slice(counts, (first, 0), (s, counts.shape[1]))
        logits_SxV = sampling.penalized_logits(
            logits_Sx1xV[:, 0], counts_SxV, rows["presence"], rows["frequency"]
        )
        out = self._next_token(logits_Sx1xV[:, 0], logits_SxV, rows)
        drawn_SxV = jax.nn.one_hot(out["token"], counts.shape[1], dtype=jnp.int32)
        counts_SxV = counts_SxV + drawn_SxV * rows["active"][:, None]
        counts = jax.lax.dynamic_update_slice(counts, counts_SxV, (first, 0))
        drawn_S = jnp.where(rows["active"], out["token"], tokens_S)
        last_S = jax.lax.dynamic_update_slice(last_S, drawn_S, (first,))
        out["active_experts"] = self._active_experts(routings, (s, 1))[:, 0]
        num_experts = self.config.moe.num_experts
        out["experts_read"] = sum(
            jnp.sum(
                jnp.zeros(num_experts, jnp.int32).at[r.expert_ids].add(r.valid, mode="drop") > 0
            )
            for r in routings
        ) if routings else jnp.zeros((), jnp.int32)  # fmt: skip
        return (cache, counts, last_S), out
