"""Model steps with offloaded experts: each prefill and decode step runs layer by layer, and the
experts a layer routes to are copied into a device cache (`jmoe.serve.offload`) before they run.

Per MoE layer `i` of a step:
1. a compiled "attend + route" part: `Block.attend`, `ffn_norm` and the layer's router give
   the step's `Routing` (its expert ids come to the host: a `[T, K]` copy);
2. the host makes the routed experts of the real tokens resident (`ExpertCache.ensure`,
   copying in only the missing ones) and rewrites each slot's expert id to its cache slot;
3. a compiled "experts + combine" part runs the dispatch and `jmoe.kernels.expert_mlp` over
   the `[N, D, F]` cache arrays (N slots instead of E experts), the shared experts and the
   block's residual;
4. with prefetch on, the next MoE layer's `ffn_norm` and router are applied to the stream `x`
   that leaves layer `i` (skipping its attention), and the experts they pick are copied in
   while that layer's attention runs.

Tokens outside the step's mask (padding, idle slots) are not routed to any expert: their
outputs are never read. Whatever the cache holds, each real token's slots run the same experts
on the same weights as in `ModelSteps` and are combined in the same order (only the rows'
order in the grouped matmul differs), so greedy decoding gives the same tokens. A
prefill that needs more experts in one layer than the cache holds runs that layer's experts in
passes of at most N experts, summing the passes' outputs (equal up to the rounding of that
sum); a decode step never needs more (the cache holds at least `min(slots * K, E)`).

The rest of a step (the KV cache rows read and written, sampling, penalties, statistics) is
`ModelSteps`' own compiled code, run around the layer loop's outputs (`_Replayed`). Compiled
parts are shared by the layers of one kind; a prefill in passes compiles its pass variants on
first use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import kernels
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Block, init_cache
from jmoe.lm.param_layout import moe_layers
from jmoe.moe import dispatch
from jmoe.moe.layer import expert_mlp_options, router_gate, shared_experts, shared_output
from jmoe.moe.routing import Routing
from jmoe.moe.stats import mlp_weight_names
from jmoe.serve.offload import ExpertCache, ExpertStore, cache_experts
from jmoe.serve.steps import ModelSteps


def _without_experts(config: ModelConfig, variables: dict) -> dict:
    """The variables without the MoE layers' `experts` subtrees (unrolled layout)."""
    params = dict(variables["params"])
    for i in moe_layers(config):
        layer = dict(params[f"layers_{i}"])
        layer["moe"] = {k: v for k, v in layer["moe"].items() if k != "experts"}
        params[f"layers_{i}"] = layer
    return {**variables, "params": params}


class OffloadSteps(ModelSteps):
    """`ModelSteps` whose routed experts live in host memory and a device `ExpertCache`.

    Args:
      config, variables, num_slots, vocab_limit: as for `ModelSteps` (unrolled layout).
      cache_size: device slots, in experts (int) or bytes ("512MiB"); default E (one layer's
        experts). At least `min(num_slots * K, E)`, the most one layer needs in a decode
        step; more than every expert of the model is cut to that.
      prefetch: copy the experts the next layer's router predicts while attention runs.

    Raises:
      ValueError: a cache smaller than a decode step needs, or a model without MoE layers.
      NotImplementedError: chain-of-experts layers (`chain_steps > 1`), or experts with
        weights other than the plain MLP's (quantization scales).
    """

    def __init__(
        self,
        config: ModelConfig,
        variables,
        num_slots: int,
        vocab_limit: int,
        cache_size: int | str | None = None,
        prefetch: bool = True,
    ):
        moe = dataclasses.replace(config.moe, dtype=config.dtype, param_dtype=config.param_dtype)
        if moe.chain_steps != 1:
            raise NotImplementedError(
                f"offloaded experts need one routing per layer; chain_steps={moe.chain_steps}"
            )
        device = jax.devices()[0]
        self.store = ExpertStore(config, variables, config.dtype, device)
        names = mlp_weight_names(moe.activation) + ("w_down",)
        if moe.expert_bias:
            names += tuple("b" + name[1:] for name in names)
        if unknown := sorted(set(self.store.names) - set(names)):
            raise NotImplementedError(
                f"offloaded experts run plain expert weights {names}; the model's experts also "
                f"have {unknown} (quantized experts?), which the offloaded steps would ignore"
            )
        super().__init__(config, _without_experts(config, variables), num_slots, vocab_limit)
        need = min(num_slots * moe.slots, moe.num_experts)
        size = moe.num_experts if cache_size is None else cache_size
        capacity = cache_experts(size, self.store.set_bytes)
        if capacity < need:
            raise ValueError(
                f"an expert cache of {capacity} experts ({size!r}) is too small: one decode "
                f"step of {num_slots} slots x {moe.slots} routed experts can need "
                f"{need} experts of one layer; use expert_cache >= {need} (or fewer slots)"
            )
        capacity = min(capacity, len(self.store.layers) * self.store.num_experts)
        self.expert_cache = ExpertCache(self.store, capacity, device)
        self.prefetch = prefetch
        self.moe_config = moe
        self.moe_layer_ids = moe_layers(config)
        # The layer loop runs from the host (`_layers`), each layer's halves compiled; the rest
        # of a step is `ModelSteps`' own compiled code around the loop's outputs (`_Replayed`).
        self._prefill, self._decode = self._prefill_host, self._decode_host
        self._compiled: dict[tuple[bool, int | None], dict] = {}
        self._prefill_rest = jax.jit(
            functools.partial(_replayed, ModelSteps._prefill_fn, self),
            donate_argnums=1,
            static_argnums=3,
        )
        self._decode_rest = jax.jit(
            functools.partial(_replayed, ModelSteps._decode_fn, self),
            donate_argnums=1,
            static_argnums=3,
        )
        self._view = jax.jit(_view, static_argnums=(2, 3))
        self._embed = jax.jit(lambda params, t: self.model.apply(
            {"params": params}, t, method=lambda m, t: m.embed(t).astype(jnp.float32)))  # fmt: skip
        self._logits = jax.jit(self._logits_fn)

    # ------------------------------------------------------------------------ the layer loop

    def _prefill_host(self, variables, state, inputs, prompt_logprobs: bool):
        """`ModelSteps._prefill_fn` with the layers run by `_layers`; `state` is `(cache,
        counts, last tokens)`."""
        _, length, tokens_1xP, _ = inputs
        positions_1xP = np.arange(tokens_1xP.shape[1], dtype=np.int32)[None]
        dtype = jax.tree.leaves(state[0])[0].dtype
        fresh = init_cache(self.config, 1, tokens_1xP.shape[1], dtype)
        applied = self._layers(variables, tokens_1xP, positions_1xP, fresh, positions_1xP < length)
        return self._prefill_rest(variables, state, inputs, prompt_logprobs, applied)

    def _decode_host(self, variables, state, inputs, length: int):
        """`ModelSteps._decode_fn` with the layers run by `_layers`; each slot's input is its
        last drawn token, kept on the device in `state`."""
        cache, _, last_S = state
        first, positions_S, rows = inputs
        n = len(positions_S)
        tokens_S = last_S[int(first) : int(first) + n]
        view = self._view(cache, first, n, length)
        applied = self._layers(
            variables, tokens_S[:, None], positions_S[:, None], view, rows["active"][:, None]
        )
        return self._decode_rest(variables, state, inputs, length, applied)

    def _layers(self, variables, tokens_BxS, positions_BxS, cache, mask_BxS):
        """What `ModelSteps._apply` returns (logits, cache, routings), layer by layer."""
        params = variables["params"]
        moe_state = variables.get("moe_state", {})
        n = tokens_BxS.shape[0] * tokens_BxS.shape[1]
        mask_T = np.ones(n, bool) if mask_BxS is None else np.asarray(mask_BxS).reshape(n)
        outer = {k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params}
        x_BxSxD = self._embed(outer, tokens_BxS)
        routings, caches, predicted = [], [], None
        for i in range(self.config.n_layers):
            p = params[f"layers_{i}"]
            state = moe_state.get(f"layers_{i}", {}).get("moe", {})
            fns = self._layer_fns(self.config.is_moe_layer(i), self.config.layer_window(i))
            layer_cache = {k: c[i] for k, c in cache.items()}
            if not self.config.is_moe_layer(i):
                x_BxSxD, layer_cache = fns["dense"](p, x_BxSxD, layer_cache, positions_BxS)
                caches.append(layer_cache)
                continue
            x_BxSxD, h_BxSxD, layer_cache, routing = fns["attend"](
                p, state, x_BxSxD, layer_cache, positions_BxS
            )
            caches.append(layer_cache)
            if predicted is not None:  # started before this layer's routing is waited for
                self.expert_cache.prefetch(i, _routed_experts(*jax.device_get(predicted), mask_T))
            ids_TxK, valid_TxK = jax.device_get((routing.expert_ids, routing.valid))
            valid_TxK = valid_TxK & mask_T[:, None]
            x_BxSxD = self._experts(fns, i, p, x_BxSxD, h_BxSxD, ids_TxK, valid_TxK, routing)
            routings.append(routing)
            predicted = None
            later = [j for j in self.moe_layer_ids if j > i]
            if self.prefetch and later:
                j = later[0]
                p_j = params[f"layers_{j}"]
                state_j = moe_state.get(f"layers_{j}", {}).get("moe", {})
                fns_j = self._layer_fns(True, self.config.layer_window(j))
                predicted = fns_j["predict"](p_j, state_j, x_BxSxD)
        if isinstance(next(iter(cache.values())), tuple):
            cache = {k: tuple(c[k] for c in caches) for k in cache}
        else:
            cache = {k: jnp.stack([c[k] for c in caches]) for k in cache}
        return self._logits(outer, x_BxSxD), cache, routings

    def _logits_fn(self, params, x_BxSxD):
        """The model's logits, ids at or above `vocab_limit` masked (as `ModelSteps._apply`)."""
        logits_BxSxV = self.model.apply(
            {"params": params}, x_BxSxD, method=lambda m, x: m._logits(x)
        )
        if self.vocab_limit < logits_BxSxV.shape[-1]:
            ids_V = jnp.arange(logits_BxSxV.shape[-1])
            logits_BxSxV = jnp.where(ids_V < self.vocab_limit, logits_BxSxV, -jnp.inf)
        return logits_BxSxV

    def _experts(self, fns, layer, p, x_BxSxD, h_BxSxD, ids_TxK, valid_TxK, routing):
        """Layer `layer`'s experts on the cache, in as few passes as the cache allows."""
        needed = np.unique(ids_TxK[valid_TxK])
        capacity, unused = self.expert_cache.capacity, self.moe_config.num_experts
        passes = [needed[j : j + capacity] for j in range(0, len(needed), capacity)]
        y_TxD = None
        for number, group in enumerate(passes or [needed]):
            slot_of = self.expert_cache.ensure(layer, group, needed)
            # 1. A lookup table from expert id to cache slot; ids outside the pass (and the
            #    unused-slot id E) go to slot `capacity`, the bucket no group computes.
            table = np.full(unused + 1, capacity, np.int32)
            table[list(slot_of)] = list(slot_of.values())
            in_pass_TxK = valid_TxK & np.isin(ids_TxK, group)
            slots_TxK = np.where(in_pass_TxK, table[np.minimum(ids_TxK, unused)], capacity)
            finish = number == max(len(passes), 1) - 1
            y_TxD = fns["experts"](
                p, self.expert_cache.arrays, x_BxSxD, h_BxSxD,
                (slots_TxK.astype(np.int32), routing.weights, in_pass_TxK), y_TxD, finish,
            )  # fmt: skip
        return y_TxD

    # --------------------------------------------------------------- compiled layer halves

    def _layer_fns(self, moe: bool, window: int | None) -> dict:
        """The compiled parts of a block of this kind (one set per kind, shared by layers)."""
        if (moe, window) not in self._compiled:
            self._compiled[moe, window] = self._compile_layer(moe, window)
        return self._compiled[moe, window]

    def _compile_layer(self, moe: bool, window: int | None) -> dict:
        block = Block(self.config, moe, None, window)
        if not moe:

            def dense(params, x, cache, positions):
                x, (_, cache) = block.apply({"params": params}, x, cache, positions, None, True)
                return x, cache

            return {"dense": jax.jit(dense)}
        gate = router_gate(self.moe_config)

        def route(params, state, h_BxSxD) -> Routing:
            h_TxD = h_BxSxD.reshape(-1, h_BxSxD.shape[-1])
            return gate.apply({"params": params["moe"]["router"]}, h_TxD, state)

        def attend(params, state, x, cache, positions):
            def halves(b, x, cache, positions):
                x, cache = b.attend(x, cache, positions)
                return x, b.ffn_norm(x), cache

            x, h, cache = block.apply({"params": params}, x, cache, positions, method=halves)
            return x, h, cache, route(params, state, h)

        def predict(params, state, x):
            h = block.apply({"params": params}, x, method=lambda b, x: b.ffn_norm(x))
            routing = route(params, state, h)
            return routing.expert_ids, routing.valid

        experts = functools.partial(self._experts_fn, block)
        return {
            "attend": jax.jit(attend),
            "predict": jax.jit(predict),
            "experts": jax.jit(experts, static_argnums=6),
        }

    def _experts_fn(self, block, params, arrays, x_BxSxD, h_BxSxD, route, y_prev, finish):
        """One pass of the routed experts over the cache `arrays` (slot ids in `route`), plus
        `y_prev`; the last pass adds the shared experts and the residual and returns the new
        stream, earlier ones the partial `y_TxD`."""
        cfg, n = self.moe_config, self.expert_cache.capacity
        slots_TxK, weights_TxK, valid_TxK = route
        h_TxD = h_BxSxD.reshape(-1, h_BxSxD.shape[-1])
        dtype = jnp.dtype(cfg.dtype)
        routed = Routing(slots_TxK, weights_TxK, valid_TxK, probs=None, logits=None)
        max_rows = cfg.router.max_rows(h_TxD.shape[0], cfg.num_experts, True)
        plan = dispatch.make_plan(routed, n, max_rows)
        names = mlp_weight_names(cfg.activation)
        biases = cfg.expert_bias
        y_RxD = kernels.expert_mlp(
            dispatch.permute(h_TxD.astype(dtype), plan),
            tuple(arrays[name] for name in names),
            arrays["w_down"],
            plan.group_sizes,
            b_in=tuple(arrays["b" + name[1:]] for name in names) if biases else None,
            b_down_GxD=arrays["b_down"] if biases else None,
            **expert_mlp_options(cfg),
        )
        y_TxD = dispatch.combine(y_RxD, plan, weights_TxK)
        if y_prev is not None:
            y_TxD = y_prev + y_TxD
        if not finish:
            return y_TxD
        if (shared := shared_experts(cfg)) is not None:
            mlp, gate = shared
            bound = (
                mlp.bind({"params": params["moe"]["shared"]}),
                None if gate is None else gate.bind({"params": params["moe"]["shared_gate"]}),
            )
            y_TxD = y_TxD + shared_output(bound, h_TxD).astype(dtype)
        if cfg.chain_residual == "coe":  # the layer returns its input plus its output
            y_TxD = h_TxD + y_TxD
        y_BxSxD = y_TxD.reshape(h_BxSxD.shape).astype(dtype)
        return block.apply({"params": {}}, x_BxSxD, y_BxSxD, method=Block.ffn_residual)


class _Replayed:
    """The steps, with `_apply` returning the layer loop's outputs (`applied`) instead of
    running the model, so that `ModelSteps`' compiled step code runs around them."""

    def __init__(self, steps: OffloadSteps, applied):
        self._steps, self._applied = steps, applied

    def _apply(self, *args):
        return self._applied

    def __getattr__(self, name: str):
        return getattr(self._steps, name)


def _replayed(step_fn, steps, variables, state, inputs, static, applied):
    """`step_fn` (a `ModelSteps` step) of `steps` around the precomputed `applied`."""
    return step_fn(_Replayed(steps, applied), variables, state, inputs, static)


def _view(cache, first, num_rows: int, length: int):
    """The cache rows `first .. first + num_rows - 1`, positions `0 .. length - 1`: what a
    `ModelSteps` decode step reads."""
    return {
        name: tuple(
            jax.lax.dynamic_slice(
                c, (first,) + (0,) * (c.ndim - 1), (num_rows, length, *c.shape[2:])
            )
            for c in layers
        )
        for name, layers in cache.items()
    }


def _routed_experts(ids_TxK: np.ndarray, valid_TxK: np.ndarray, mask_T: np.ndarray) -> np.ndarray:
    """The distinct experts the masked-in tokens of a routing use."""
    return np.unique(ids_TxK[valid_TxK & mask_T[:, None]])
