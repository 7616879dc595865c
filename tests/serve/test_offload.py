"""Offloaded experts (jmoe.serve.offload, jmoe.serve.offload_steps): the LRU cache against a
plain list replay, the weights in each slot, cache sizes, and greedy decoding with a cache
smaller than the model's experts against the resident engine (same tokens)."""

import pathlib
import runpy

import jax
import numpy as np
import pytest
from conftest import SLOTS, TOKENIZER_VOCAB
from prometheus_client.parser import text_string_to_metric_families

from jmoe.compress.surgery import expert_param_bytes, moe_layer_weights
from jmoe.compress.trace import layer_routings
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe.config import MoEConfig
from jmoe.serve import Engine
from jmoe.serve.metrics import ServerMetrics
from jmoe.serve.offload import ExpertCache, ExpertStore, cache_experts
from jmoe.train.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Lengths in two prompt buckets, more prompts than slots (requests join mid-decode).
PROMPTS = ["a", "def f(x):", "import os\nimport sys\n", "x" * 17, "class A:\n" * 3, "zz"]
MAX_TOKENS = 6


def _ids(text):
    return ByteTokenizer().encode(text)


def _replay(events, capacity):
    """Hits, misses, evictions and the final LRU order (least recent first) of a list-based
    LRU replaying `("ensure" | "prefetch", layer, experts)` events."""
    order, hits, misses, evictions = [], 0, 0, 0
    for kind, layer, experts in events:
        keys = [(layer, int(e)) for e in sorted(set(experts))]
        if kind == "prefetch" and len(keys) > capacity:
            continue
        present = [k for k in keys if k in order]
        for key in present:  # touched first: the loads below never evict them
            order.remove(key)
            order.append(key)
        for key in keys:
            if key in order:
                continue
            if len(order) == capacity:
                order.pop(0)
                evictions += 1
            order.append(key)
        if kind == "ensure":
            hits += len(present)
            misses += len(keys) - len(present)
    return hits, misses, evictions, order


def _recording(cache):
    """Logs every `ensure` / `prefetch` call of `cache` from now on in `cache.events`."""
    if not hasattr(cache, "events"):
        ensure, prefetch = cache.ensure, cache.prefetch

        def logged_ensure(layer, experts, step_experts=None):
            cache.events.append(("ensure", layer, list(experts)))
            return ensure(layer, experts, step_experts)

        def logged_prefetch(layer, experts):
            cache.events.append(("prefetch", layer, list(experts)))
            return prefetch(layer, experts)

        cache.ensure, cache.prefetch = logged_ensure, logged_prefetch
    cache.events = []
    return cache


@pytest.fixture(scope="module")
def store(run):
    _, config, state = run
    variables = {"params": state.params, "moe_state": state.moe_state}
    return ExpertStore(config.model, variables, config.model.dtype, jax.devices()[0])


@pytest.fixture(scope="module")
def offloaded(run):
    """An engine of the run with a 4-expert cache (the model has 2 layers x 4 experts)."""
    return Engine.from_run(run[0], num_slots=SLOTS, offload_experts=True, expert_cache=4)


def test_cache_matches_a_list_lru_and_holds_the_right_weights(run, store):
    rng = np.random.default_rng(0)
    cache = ExpertCache(store, 3, jax.devices()[0])
    params = {"params": run[2].params}
    weights = {w.layer: w.params["experts"] for w in moe_layer_weights(run[1].model, params)}
    events = []
    for _ in range(40):
        layer = int(rng.choice(store.layers))
        experts = rng.choice(store.num_experts, int(rng.integers(0, 4)), replace=False)
        kind = "prefetch" if rng.random() < 0.3 else "ensure"
        events.append((kind, layer, experts))
        if kind == "prefetch":
            cache.prefetch(layer, experts)
            continue
        slots = cache.ensure(layer, experts)
        assert sorted(slots) == sorted(int(e) for e in experts)
        for e, slot in slots.items():
            for name, array in cache.arrays.items():
                np.testing.assert_array_equal(array[slot], weights[layer][name][e])
    hits, misses, evictions, order = _replay(events, 3)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (hits, misses, evictions)
    assert cache.resident() == order
    assert stats.bytes_moved == (stats.misses + stats.prefetched) * store.set_bytes
    assert stats.prefetch_hits + stats.prefetch_wasted <= stats.prefetched
    with pytest.raises(ValueError, match="needs 4 experts at once but the cache holds 3"):
        cache.ensure(store.layers[0], range(4))


def test_prefetches_count_as_used_or_wasted_at_their_layers_step(store):
    cache = ExpertCache(store, 4, jax.devices()[0])
    first, second = store.layers[:2]
    cache.prefetch(first, [1, 2])
    cache.prefetch(second, [0])
    cache.ensure(first, [2], step_experts=[2, 3])  # one pass of a step that needs 2 and 3
    assert (cache.stats.prefetch_hits, cache.stats.prefetch_wasted) == (1, 1)  # 2 used, 1 not
    cache.ensure(first, [3, 0])  # one free slot, then (first, 1) is evicted
    cache.ensure(first, [1])  # evicts (second, 0), prefetched and never used: wasted
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 2)
    assert (cache.stats.prefetch_hits, cache.stats.prefetch_wasted) == (1, 2)
    assert cache.resident() == [(first, 2), (first, 0), (first, 3), (first, 1)]
    assert cache.stats.prefetched == 3


def test_cache_sizes_in_experts_or_bytes(store):
    n = store.set_bytes
    assert store.set_bytes == sum(np.prod(s) for s in store.shapes.values()) * 4  # float32
    assert cache_experts(5, n) == cache_experts("5", n) == 5
    assert cache_experts(f"{3 * n + 1}B", n) == 3
    assert cache_experts("1KiB", n) == 1024 // n and cache_experts("0.001MB", n) == 1000 // n
    with pytest.raises(ValueError, match="neither a number of experts nor a byte size"):
        cache_experts("lots", n)


def test_too_small_a_cache_is_refused_at_construction(run):
    # 4 slots x top-2 can need all 4 experts of a layer in one decode step
    with pytest.raises(ValueError, match="use expert_cache >= 4"):
        Engine.from_run(run[0], num_slots=SLOTS, offload_experts=True, expert_cache=3)
    with pytest.raises(ValueError, match="pass offload_experts=True"):
        Engine.from_run(run[0], expert_cache=3)


def test_greedy_offloaded_equals_resident(engine, offloaded):
    want = engine.generate(PROMPTS, max_tokens=MAX_TOKENS, logprobs=1)
    cache = _recording(offloaded.steps.expert_cache)
    got = offloaded.generate(PROMPTS, max_tokens=MAX_TOKENS, logprobs=1)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(
            [t.logprob for t in g.logprobs], [t.logprob for t in w.logprobs], atol=1e-5
        )
        assert g.active_experts == pytest.approx(w.active_experts)
    stats = cache.stats
    hits, misses, evictions, order = _replay(cache.events, cache.capacity)
    assert (stats.hits, stats.misses, stats.evictions) == (hits, misses, evictions) != (0, 0, 0)
    assert stats.evictions > 0 and stats.prefetched > 0 and cache.resident() == order
    assert offloaded.device_expert_bytes == 4 * offloaded.steps.store.set_bytes
    assert engine.device_expert_bytes == 2 * offloaded.device_expert_bytes  # 8 experts, float32
    text = ServerMetrics(offloaded).render().decode()
    metrics = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert metrics["jmoe_expert_cache_hits_total"] == stats.hits
    assert metrics["jmoe_expert_cache_misses_total"] == stats.misses
    assert metrics["jmoe_expert_cache_bytes_moved_total"] == stats.bytes_moved
    assert metrics["jmoe_device_expert_bytes"] == offloaded.device_expert_bytes


def test_a_prefill_loads_exactly_the_routed_experts(run, offloaded):
    """Without prefetch, a lone prompt's prefill asks each layer for the experts the model
    routes its tokens to (`jmoe.compress.trace`), and nothing else."""
    _, config, state = run
    cache = _recording(offloaded.steps.expert_cache)
    offloaded.steps.prefetch = False
    try:
        offloaded.generate("import os", max_tokens=1)
    finally:
        offloaded.steps.prefetch = True
    tokens = np.asarray([_ids("import os")])
    routings = layer_routings(config.model, {"params": state.params,
                                             "moe_state": state.moe_state}, tokens)  # fmt: skip
    want = [
        ("ensure", layer, sorted(set(np.asarray(r.expert_ids)[np.asarray(r.valid)].tolist())))
        for layer, (r,) in sorted(routings.items())
    ]
    assert [(k, layer, sorted(int(e) for e in ex)) for k, layer, ex in cache.events] == want


def test_prefill_in_passes_when_the_cache_is_smaller_than_a_layer(run, forward):
    """One slot needs 2 experts per decode step; a prompt's prefill needs more, run in passes
    of at most 2 over a 2-expert cache."""
    engine = Engine.from_run(run[0], num_slots=1, offload_experts=True, expert_cache=2)
    _, config, state = run
    cache = _recording(engine.steps.expert_cache)
    prompt = "import os\nimport sys\n"
    [got] = engine.generate(prompt, max_tokens=4)
    ids = list(got.token_ids)
    assert ids == forward([_ids(prompt)], 4)[0][: len(ids)]
    # the prefill's first events: layer 0's passes, each a new group of at most 2 experts
    passes = []
    for kind, layer, experts in cache.events:
        if (kind, layer) != ("ensure", cache.store.layers[0]):
            break
        passes.append([int(e) for e in experts])
    routed = [e for group in passes for e in group]
    assert len(passes) >= 2 and all(len(group) <= 2 for group in passes)
    assert len(set(routed)) == len(routed) > 2
    variables = {"params": state.params, "moe_state": state.moe_state}
    assert engine.device_expert_bytes * 4 == expert_param_bytes(config.model, variables)


def test_serve_py_flags(run, engine, offloaded, capsys, monkeypatch):
    """serve.py passes its flags to the engine (the offloaded engine above stands in for the one
    it would build) and prints the resident engine's greedy text."""
    built = []

    def from_run(run_dir, **kwargs):
        built.append((run_dir, kwargs))
        return offloaded

    monkeypatch.setattr(Engine, "from_run", from_run)
    main = runpy.run_path(str(ROOT / "serve.py"), run_name="serve_under_test")["main"]
    main(["--run", str(run[0]), "--slots", "2", "--offload-experts", "--expert-cache", "4",
          "--prompt", "def f(", "--max-tokens", "5"])  # fmt: skip
    options = dict(num_slots=2, max_queue=64, quantize=None, offload_experts=True, expert_cache="4")
    assert built == [(str(run[0]), options)]
    assert capsys.readouterr().out == engine.generate("def f(", max_tokens=5)[0].text + "\n"
    with pytest.raises(SystemExit):
        main(["--run", str(run[0]), "--expert-cache", "4"])
    assert "--expert-cache sizes the cache of --offload-experts" in capsys.readouterr().err


def test_shared_experts_biases_and_a_dense_layer():
    """A dense first layer, then a MoE layer with shared experts, a shared gate and expert
    biases: the offloaded path applies them as the resident MoE does."""
    moe = MoEConfig(d_ff=16, num_experts=4, num_shared=1, shared_gate=True, expert_bias=True)
    config = ModelConfig(vocab_size=260, d_model=16, n_layers=3, n_heads=2, d_ff=32,
                         max_seq_len=32, first_dense_layers=1, moe=moe)  # fmt: skip
    variables = jax.jit(Transformer(config).init)(jax.random.key(1), np.zeros((1, 8), np.int32))
    # non-zero expert biases, so that a bias dropped or misplaced changes the output
    biases = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if "/b_" in jax.tree_util.keystr(path, separator="/") else a,
        variables,
    )
    engine = Engine(config, biases, ByteTokenizer(), num_slots=1, offload_experts=True,
                    expert_cache=2)  # fmt: skip
    got = engine.generate(PROMPTS[:2], max_tokens=4)
    apply = jax.jit(lambda tokens: Transformer(config).apply(biases, tokens)[0])
    for completion, prompt in zip(got, PROMPTS[:2], strict=True):
        ids = _ids(prompt)
        for _ in completion.token_ids:  # greedy over the full forward, no KV cache
            tokens = np.zeros((1, config.max_seq_len), np.int32)
            tokens[0, : len(ids)] = ids
            ids.append(int(np.argmax(apply(tokens)[0, len(ids) - 1, :TOKENIZER_VOCAB])))
        assert list(completion.token_ids) == ids[len(_ids(prompt)) :]
    assert engine.steps.expert_cache.stats.evictions > 0
