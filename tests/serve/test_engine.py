"""jmoe.serve.Engine against the full forward pass: exact greedy text through the KV cache with
continuous batching, reproducible sampling, stops, log-probabilities, input checks, and no
compilation after warm-up."""

import dataclasses
import time

import jax
import numpy as np
import pytest
from conftest import SLOTS, TINY, TOKENIZER_VOCAB

import jmoe
from jmoe.lm.model import Transformer
from jmoe.lm.param_layout import stack_layers
from jmoe.serve import Engine, InvalidRequestError, SamplingParams
from jmoe.serve.batching import Request
from jmoe.serve.steps import compilations
from jmoe.train.run_config import load_config
from jmoe.train.tokenizer import ByteTokenizer

# Lengths in every prompt bucket (16, 32, 64), more prompts than slots.
PROMPTS = ["a", "def f(x):", "import os\nimport sys\n", "x" * 17, "class A:\n" * 4, "z" * 40]


def _ids(text):
    return ByteTokenizer().encode(text)


def test_greedy_equals_the_full_forward_argmax(engine, forward):
    max_tokens = [12, 5, 9, 3, 7, 11]
    got = [
        engine.generate(p, max_tokens=m)[0] for p, m in zip(PROMPTS, max_tokens, strict=True)
    ]  # one at a time
    want = forward([_ids(p) for p in PROMPTS], max(max_tokens))
    for completion, w, m in zip(got, want, max_tokens, strict=True):
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop":  # ended by the end-of-text id
            assert ids[-1] == ByteTokenizer.eos_id and ids == w[: len(ids)]
        else:
            assert ids == w[:m] and completion.finish_reason == "length"
        assert all(0 <= i < TOKENIZER_VOCAB for i in ids)


def test_a_batch_gives_each_prompt_its_own_greedy_text(engine):
    max_tokens = 10
    alone = [engine.generate(p, max_tokens=max_tokens)[0] for p in PROMPTS]
    together = engine.generate(PROMPTS, max_tokens=max_tokens)  # 6 prompts through 4 slots
    assert len(PROMPTS) > SLOTS
    for a, t in zip(alone, together, strict=True):
        assert (a.text, a.token_ids, a.finish_reason) == (t.text, t.token_ids, t.finish_reason)
        assert a.prompt_ids == t.prompt_ids


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50)
    alone = engine.generate("def f(", seed=11, **kw)[0]
    batched = engine.generate(["x", "def f(", "import"], seed=11, **kw)[1]
    assert alone.token_ids == batched.token_ids
    others = {engine.generate("def f(", seed=s, **kw)[0].token_ids for s in (12, 13, 14)}
    assert len(others | {alone.token_ids}) > 1  # the seed matters


def test_stop_strings_and_stop_tokens(engine):
    full = engine.generate("def", max_tokens=20)[0]
    ids, text = full.token_ids, full.text
    assert len(ids) == 20, "the reference completion should run to max_tokens"
    stop = text[5:8]
    cut = engine.generate("def", max_tokens=20, stop=[stop, "never"])[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    by_token = engine.generate("def", max_tokens=20, stop_token_ids=[ids[4]])[0]
    first = ids.index(ids[4])
    assert by_token.finish_reason == "stop" and by_token.token_ids == ids[: first + 1]
    assert by_token.text == ByteTokenizer().decode(ids[:first])


def test_logprobs_and_echo_match_the_full_forward(engine, forward):
    prompt = _ids("def f(x): return")
    [c] = engine.generate([prompt], max_tokens=4, logprobs=3, echo=True)
    logits = forward.logits_of([prompt + list(c.token_ids)])[0, :, :TOKENIZER_VOCAB]
    logp = jax.nn.log_softmax(logits, axis=-1)
    ids = prompt + list(c.token_ids)
    assert c.prompt_logprobs[0].logprob is None
    scored = [e.logprob for e in c.prompt_logprobs[1:]] + [e.logprob for e in c.logprobs]
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(scored, want, atol=2e-4)
    top = c.logprobs[0].top
    assert [i for i, _ in top] == list(np.argsort(-logp[len(prompt) - 1])[:3])
    # max_tokens=0 with echo scores the prompt alone (lm-evaluation-harness loglikelihood)
    [score] = engine.generate([prompt], max_tokens=0, logprobs=1, echo=True)
    assert score.token_ids == () and score.finish_reason == "length"
    np.testing.assert_allclose(
        [e.logprob for e in score.prompt_logprobs[1:]], want[: len(prompt) - 1], atol=2e-4
    )


def test_penalties_match_a_numpy_reference_on_the_full_forward(engine, forward):
    presence, frequency, steps = 0.7, 1.3, 10
    prompts = [_ids("aaaa"), _ids("def f(x):")]
    got = engine.generate(
        prompts, max_tokens=steps, presence_penalty=presence, frequency_penalty=frequency
    )
    rows = [list(p) for p in prompts]
    for _ in range(steps):  # greedy on mu[j] - c[j] * frequency - (c[j] > 0) * presence
        logits = forward.logits_of(rows)
        for r, ids in enumerate(rows):
            counts = np.bincount(ids[len(prompts[r]) :], minlength=TOKENIZER_VOCAB)
            mu = logits[r, len(ids) - 1, :TOKENIZER_VOCAB] - counts * frequency
            ids.append(int(np.argmax(mu - (counts > 0) * presence)))
    want = [ids[len(p) :] for ids, p in zip(rows, prompts, strict=True)]
    for completion, w in zip(got, want, strict=True):
        ids = list(completion.token_ids)
        assert ids == w[: len(ids)] and (len(ids) == steps or ids[-1] == ByteTokenizer.eos_id)
    plain = [list(c.token_ids) for c in engine.generate(prompts, max_tokens=steps)]
    assert plain != [list(c.token_ids) for c in got]  # the penalties changed the text


def test_active_experts_per_token(engine):
    [c] = engine.generate("def", max_tokens=5)
    assert c.active_experts == 2.0 and c.prompt_active_experts == 2.0  # top-2, dropless


@pytest.mark.parametrize(
    "prompt, max_tokens, param, match",
    [
        ([], 4, "prompt", "empty"),
        ("", 4, "prompt", "empty"),
        ([1, 2, 300], 4, "prompt", "id 300 at position 2 is outside the vocabulary"),
        ([5, -1], 4, "prompt", "id -1 at position 1"),
        ([257], 4, "prompt", r"outside the vocabulary \[0, 257\)"),
        ("x" * 65, 0, "prompt", "65 tokens but the model's context holds 64"),
        ("x" * 60, 5, "max_tokens", "60 tokens \\+ max_tokens=5 = 65 exceed"),
        ("x", -1, "max_tokens", "max_tokens=-1"),
    ],
)
def test_bad_input_is_refused_with_the_field(engine, prompt, max_tokens, param, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        engine.generate([prompt], max_tokens=max_tokens)
    assert info.value.param == param


def test_nothing_compiles_after_warmup(engine):
    before = compilations()
    engine.generate(PROMPTS, max_tokens=6)
    engine.generate(["q" * 63], max_tokens=1)  # the longest bucket
    engine.generate(PROMPTS[:2], max_tokens=4, temperature=0.8, top_k=5, top_p=0.5, seed=3)
    engine.generate(PROMPTS[3:], max_tokens=3, stop=["\n"], logprobs=2)
    engine.generate(PROMPTS[:3], max_tokens=3, presence_penalty=1.0, frequency_penalty=-0.5)
    assert compilations() == before
    row = Request([0], SamplingParams(), engine.tokenizer).sampling_row()
    engine.steps.prefill(0, [1, 2], 8, row, False)  # a length outside the buckets compiles...
    assert compilations() > before  # ...which shows that the counter sees the engine's steps


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(engine):
    engine.start()  # the scheduler's own thread (as in the server)
    [long] = engine.submit(["def"], SamplingParams(max_tokens=60))
    deadline = time.monotonic() + 60
    while len(long.output_ids) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    [short] = engine.submit(["x"], SamplingParams(max_tokens=3))
    assert short.done.wait(60)
    assert not long.done.is_set()  # the short one did not wait for the long one
    engine.cancel(long)
    assert long.done.wait(60) and long.completion.finish_reason == "cancelled"
    assert engine.scheduler.active_slots == 0


def test_a_scanned_model_serves_the_same_text(run, engine):
    _, config, state = run
    scanned = dataclasses.replace(config.model, scan_layers=True, remat="full")
    variables = {
        "params": stack_layers(scanned, state.params),
        "moe_state": stack_layers(scanned, state.moe_state),
    }
    other = Engine(scanned, variables, ByteTokenizer(), num_slots=1)
    got = other.generate(PROMPTS[:2], max_tokens=6)
    want = engine.generate(PROMPTS[:2], max_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_from_run_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .* itself"):
        Engine.from_run(tmp_path / "absent")
    (tmp_path / "partial" / "tokenizer").mkdir(parents=True)
    ByteTokenizer().save(tmp_path / "partial" / "tokenizer")
    with pytest.raises(FileNotFoundError) as info:
        Engine.from_run(tmp_path / "partial")
    message = str(info.value)
    assert "config.yaml" in message and "checkpoint" in message and "tokenizer" not in message


def test_a_non_causal_router_is_refused_and_serving_is_dropless(engine):
    moe = dataclasses.replace(engine.config.moe, router=jmoe.ExpertChoice(allow_noncausal=True))
    with pytest.raises(ValueError, match="'expert_choice' is not causal"):
        Engine(dataclasses.replace(engine.config, moe=moe), {}, tokenizer=None)
    assert engine.config.moe.capacity_factor is None


def test_an_mla_model_serves_the_full_forward_greedy_text():
    """The engine's slot cache holds MLA's latents and rotated keys; greedy text through it
    (prefill, then absorbed decode steps, two requests in two slots) is the full forward's."""
    mla = "{kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 4, v_head_dim: 6}"
    scaling = "{factor: 4, original_max_position_embeddings: 16, mscale_all_dim: 1.0}"
    config = load_config(None, [*TINY, f"model.mla={mla}", f"model.rope_scaling={scaling}"]).model
    model = Transformer(config)
    variables = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))
    engine = Engine(config, variables, ByteTokenizer(), num_slots=2)
    assert {k: v[0].shape[-1] for k, v in engine.steps.cache.items()} == {"latent": 8, "k_rope": 4}
    prompts, max_tokens = PROMPTS[:2], 6
    rows = [_ids(p) for p in prompts]
    apply = jax.jit(lambda t: model.apply(variables, t)[0])
    for _ in range(max_tokens):  # right-padded rows: causal attention never sees the padding
        tokens = np.zeros((len(rows), 16), np.int32)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)] = ids
        logits = np.asarray(apply(tokens))
        for r, ids in enumerate(rows):
            ids.append(int(np.argmax(logits[r, len(ids) - 1, :TOKENIZER_VOCAB])))
    got = engine.generate(prompts, max_tokens=max_tokens)
    for completion, ids, prompt in zip(got, rows, prompts, strict=True):
        want = ids[len(_ids(prompt)) :]
        assert list(completion.token_ids) == want[: len(completion.token_ids)]


def test_a_stopped_engine_serves_again(engine):
    """A server's shutdown (`stop`) leaves the engine idle, not closed: `generate` and a new
    `start` work as before."""
    before = engine.generate(PROMPTS[0], max_tokens=4)[0].text
    engine.start()
    engine.stop()
    assert engine.generate(PROMPTS[0], max_tokens=4)[0].text == before
    engine.start()
    try:
        assert engine.generate(PROMPTS[0], max_tokens=4)[0].text == before
    finally:
        engine.stop()
