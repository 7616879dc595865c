"""The HTTP server, over real HTTP on a free localhost port, with the official `openai` client
and raw `httpx`: the same text as `Engine.generate`, streaming, scoring, concurrency, limits and
errors."""

import concurrent.futures
import json
import pathlib
import re
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import API_KEY, MAX_QUEUE

from jmoe.serve import SamplingParams
from jmoe.serve.sampling import choice_seeds

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _post(server, path, body, headers=AUTH, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kw)


def _metric(server, name: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_completions_equal_engine_generate(client, engine):
    prompts = ["def f(x):", "import os\n"]
    resp = client.completions.create(model=engine.name, prompt=prompts, max_tokens=8, temperature=0)
    want = engine.generate(prompts, max_tokens=8)
    assert [c.text for c in resp.choices] == [w.text for w in want]
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.finish_reason for c in resp.choices] == [w.finish_reason for w in want]
    assert resp.usage.prompt_tokens == sum(len(w.prompt_ids) for w in want)
    assert resp.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert resp.model_extra["jmoe"]["active_experts_per_token"] == 2.0


def test_streaming_gives_the_same_text(client, engine):
    stream = client.completions.create(
        model=engine.name,
        prompt="class A:",
        max_tokens=10,
        temperature=0.9,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    [want] = engine.generate("class A:", max_tokens=10, temperature=0.9, seed=5)
    assert text == want.text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_logprobs_and_echo_for_scoring(client, engine):
    prompt = "def f(x): return x"
    resp = client.completions.create(
        model=engine.name, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    [want] = engine.generate(prompt, max_tokens=0, echo=True, logprobs=1)
    choice = resp.choices[0]
    assert choice.text == prompt
    assert choice.logprobs.tokens == list(prompt)  # byte tokens
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(
        choice.logprobs.token_logprobs[1:], [e.logprob for e in want.prompt_logprobs[1:]]
    )
    assert choice.logprobs.text_offset == list(range(len(prompt)))
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])


def test_models_health_and_metrics(server, client, engine):
    [model] = client.models.list().data
    assert model.id == engine.name == "tiny-run"
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["slots"] == engine.num_slots
    before = _metric(server, "jmoe_generation_tokens_total")
    client.completions.create(model=engine.name, prompt="ab", max_tokens=3, temperature=0)
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in (
        "jmoe_requests_total",
        "jmoe_queue_depth",
        "jmoe_batch_occupancy",
        "jmoe_time_to_first_token_seconds_bucket",
        "jmoe_generation_tokens_per_second",
        "jmoe_active_experts_per_token_sum",
    ):
        assert name in metrics
    assert _metric(server, "jmoe_generation_tokens_total") == before + 3


def test_sixteen_concurrent_clients_get_their_solo_text(client, engine):
    jobs = [
        dict(prompt=f"{i} def f{i}(", max_tokens=6 + i % 5, temperature=(i % 2) * 0.8, seed=i)
        for i in range(16)
    ]
    solo = [
        engine.generate(j["prompt"], max_tokens=j["max_tokens"], temperature=j["temperature"],
                        seed=j["seed"])[0].text
        for j in jobs
    ]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: client.completions.create(model=engine.name, **j), jobs))
    assert [r.choices[0].text for r in got] == solo


ERRORS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": 3}, 400, "prompt"),
    ({"prompt": ["a", 1]}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "n": 17}, 400, "n"),
    ({"prompt": "a", "n": 2, "best_of": 3}, 400, "best_of"),
    ({"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ({"prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "a", "tools": []}, 400, "tools"),  # unknown to the completions API
    ({"prompt": "a", "stream_options": {"x": 1}}, 400, "stream_options"),
    ({"prompt": "x" * 70, "max_tokens": 0}, 400, "prompt"),
    ({"prompt": "x" * 60, "max_tokens": 10}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1000}, 400, "max_tokens"),
    ({"prompt": [5, 900]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", ERRORS)
def test_bad_requests_get_a_json_error_naming_the_field(server, body, status, param):
    resp = _post(server, "/v1/completions", body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"]
    if param:
        assert param in error["message"]


def test_the_server_keeps_serving_after_errors(server, client, engine):
    for body, _, _ in ERRORS:
        _post(server, "/v1/completions", body)
    resp = client.completions.create(model=engine.name, prompt="ok", max_tokens=2, temperature=0)
    assert resp.choices[0].text == engine.generate("ok", max_tokens=2)[0].text


def test_the_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = _post(server, "/v1/completions", {"prompt": "a"}, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_a_full_queue_answers_429(server, engine):
    params = SamplingParams(max_tokens=50)
    flood = engine.submit(["d"] * (MAX_QUEUE + 2 * engine.num_slots), params, limit=False)
    try:
        resp = _post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "queue_full"
    finally:
        for request in flood:
            engine.cancel(request)
    assert all(r.done.wait(60) for r in flood)


def test_a_client_leaving_mid_stream_frees_its_slot(server, engine):
    cancelled = 'jmoe_requests_total{endpoint="completions",finish_reason="cancelled"}'
    before = _metric(server, cancelled)
    tokens_before = _metric(server, "jmoe_generation_tokens_total")
    body = {"prompt": "d", "max_tokens": 63, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 30  # closed after the first event: the slot must free up
    while _metric(server, cancelled) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(server, cancelled) == before + 1
    assert _metric(server, "jmoe_generation_tokens_total") - tokens_before < 63  # cut short
    assert engine.scheduler.active_slots == 0


def test_chat_without_a_template_is_a_400(client, engine):
    with pytest.raises(openai.BadRequestError, match="no chat template") as info:
        client.chat.completions.create(
            model=engine.name, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body["param"] == "messages"


def test_chat_applies_the_template(client, engine, monkeypatch):
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    monkeypatch.setattr(engine, "chat_template", template)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    resp = client.chat.completions.create(
        model=engine.name, messages=messages, max_tokens=5, temperature=0
    )
    [want] = engine.generate("<system>be brief\n<user>hi\n<assistant>", max_tokens=5)
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=engine.name, messages=messages, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def test_the_readme_client_example_runs_against_a_server(server, engine):
    """The README's openai example, pointed at this test's server, model and key."""
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    (block,) = [
        b for b in re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S) if "openai" in b
    ]
    block = block.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1")
    block = block.replace('api_key="unused"', f"api_key={API_KEY!r}")
    block = block.replace('model="tiny"', f"model={engine.name!r}")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].choices[0].text and "jmoe" in namespace["out"].model_extra


def test_n_choices_have_their_own_seeds_and_openai_indices(client, engine):
    kw = dict(max_tokens=6, temperature=1.0)
    resp = client.completions.create(model=engine.name, prompt=["ab", "cd"], n=3, seed=21, **kw)
    assert [c.index for c in resp.choices] == list(range(6))
    seeds = choice_seeds(21, 3)
    want = [engine.generate(p, seed=s, **kw)[0] for p in ("ab", "cd") for s in seeds]
    assert [c.text for c in resp.choices] == [w.text for w in want]
    assert resp.usage.prompt_tokens == 4  # each prompt counted once
    assert resp.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert len({c.text for c in resp.choices[:3]}) > 1  # the choices differ
    stream = client.completions.create(
        model=engine.name, prompt="ab", n=3, seed=21, stream=True, **kw
    )
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [w.text for w in want[:3]]


def test_penalties_through_the_server_equal_engine_generate(client, engine):
    kw = dict(max_tokens=8, temperature=0, presence_penalty=0.5, frequency_penalty=1.5)
    resp = client.completions.create(model=engine.name, prompt="aaa", **kw)
    assert resp.choices[0].text == engine.generate("aaa", **kw)[0].text


TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_content_parts_are_joined_and_other_kinds_refused(client, server, engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", TEMPLATE)
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    messages = [{"role": "system", "content": parts}, {"role": "user", "content": "hi"}]
    [want] = engine.generate("<system>be\nbrief\n<user>hi\n<assistant>", max_tokens=5)
    resp = client.chat.completions.create(
        model=engine.name, messages=messages, max_tokens=5, temperature=0
    )
    assert resp.choices[0].message.content == want.text
    raw = _post(
        server, "/v1/chat/completions", dict(messages=messages, max_tokens=5, temperature=0)
    )
    assert raw.status_code == 200 and raw.json()["choices"][0]["message"]["content"] == want.text
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="'image_url'.*text-only") as info:
        client.chat.completions.create(
            model=engine.name, messages=[{"role": "user", "content": [parts[0], image]}]
        )
    assert info.value.body["param"] == "messages"
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    raw = _post(
        server, "/v1/chat/completions", dict(messages=[{"role": "user", "content": [audio]}])
    )
    assert raw.status_code == 400 and "'input_audio'" in raw.json()["error"]["message"]


def test_chat_n_choices_and_fields_it_refuses(client, server, engine, monkeypatch):
    monkeypatch.setattr(engine, "chat_template", TEMPLATE)
    messages = [{"role": "user", "content": "hi"}]
    kw = dict(max_tokens=5, temperature=1.0)
    resp = client.chat.completions.create(
        model=engine.name, messages=messages, n=2, seed=4, response_format={"type": "text"}, **kw
    )
    want = [engine.generate("<user>hi\n<assistant>", seed=s, **kw)[0] for s in choice_seeds(4, 2)]
    assert [c.message.content for c in resp.choices] == [w.text for w in want]
    assert [c.index for c in resp.choices] == [0, 1]
    stream = client.chat.completions.create(
        model=engine.name, messages=messages, n=2, seed=4, stream=True, **kw
    )
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [w.text for w in want]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for extra, param in [
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"3": 1.0}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"audio": {"voice": "x"}}, "audio"),
    ]:
        raw = _post(server, "/v1/chat/completions", dict(messages=messages, **extra))
        assert raw.status_code == 400, (extra, raw.text)
        error = raw.json()["error"]
        assert error["param"] == param and param in error["message"]
    bad_message = [{"role": "assistant", "content": "x", "tool_calls": []}]
    raw = _post(server, "/v1/chat/completions", dict(messages=bad_message))
    assert raw.status_code == 400 and "tool_calls" in raw.json()["error"]["message"]
