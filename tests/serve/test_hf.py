"""Serving a Hugging Face checkpoint (`Engine.from_hf`, `serve.py --hf`): the imported model's
greedy text against its own forward pass, chat with the checkpoint's template over real HTTP
with the `openai` client, and start-up errors."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from conftest import LiveServer
from hf_fixtures import write_hf_checkpoint
from test_cli import _env, _serve

from jmoe.convert import CheckpointError, from_hf
from jmoe.lm.model import Transformer
from jmoe.serve.app import create_app
from jmoe.serve.batching import Request
from jmoe.serve.chat import render_chat, template_tokens
from jmoe.serve.engine import Engine
from jmoe.serve.sampling import SamplingParams

CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mixtral")


@pytest.fixture(scope="module")
def hf_engine(checkpoint):
    engine = Engine.from_hf(checkpoint, num_slots=2, max_seq_len=CONTEXT)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def client(hf_engine):
    live = LiveServer(create_app(hf_engine))
    yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    live.stop()


def _greedy_reference(checkpoint, prompt_ids, max_tokens, vocab):
    """Token-by-token argmax of the imported model's full forward pass (no KV cache)."""
    config, variables = from_hf(checkpoint)
    apply = jax.jit(lambda tokens: Transformer(config).apply(variables, tokens)[0])
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        logits = apply(jnp.asarray([ids + [0] * (CONTEXT - len(ids))]))
        ids.append(int(np.argmax(logits[0, len(ids) - 1, :vocab])))
    return ids[len(prompt_ids) :]


def test_the_engine_serves_the_checkpoint_with_its_tokenizer(checkpoint, hf_engine):
    tok = hf_engine.tokenizer
    assert hf_engine.name == "tiny-mixtral" and hf_engine.max_seq_len == CONTEXT
    assert hf_engine.chat_template == tok.chat_template is not None
    assert hf_engine.encode("fox") == [tok.bos_id, *tok.encode("fox")]  # BOS, as transformers
    assert len(tok.eos_ids) == 2 and Request([1], SamplingParams(), tok).stop_ids == {*tok.eos_ids}
    [out] = hf_engine.generate("The quick brown", max_tokens=8, stop_token_ids=[])
    want = _greedy_reference(checkpoint, out.prompt_ids, len(out.token_ids), tok.vocab_size)
    assert list(out.token_ids) == want and len(want) >= 1


def test_completions_over_http_equal_engine_generate(client, hf_engine):
    prompts = ["The quick brown", "def add("]
    resp = client.completions.create(
        model="tiny-mixtral", prompt=prompts, max_tokens=8, temperature=0
    )
    want = hf_engine.generate(prompts, max_tokens=8)
    assert [c.text for c in resp.choices] == [w.text for w in want]
    assert resp.usage.prompt_tokens == sum(len(w.prompt_ids) for w in want)


def test_chat_uses_the_checkpoint_template(client, hf_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Köln?"}]
    resp = client.chat.completions.create(
        model="tiny-mixtral", messages=messages, max_tokens=6, temperature=0
    )
    tok = hf_engine.tokenizer
    prompt = render_chat(tok.chat_template, messages, **template_tokens(tok))
    assert prompt.endswith("<|im_start|>user\nKöln?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)  # no second BOS: the template wrote the prompt's special tokens
    [want] = hf_engine.generate(ids, max_tokens=6)
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="tiny-mixtral", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def test_a_checkpoint_without_a_chat_template(tmp_path, client, hf_engine, monkeypatch):
    directory = write_hf_checkpoint(tmp_path / "no-template", chat_template=None)
    assert Engine.from_hf(directory, max_seq_len=CONTEXT).chat_template is None
    monkeypatch.setattr(hf_engine, "chat_template", None)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(
            model="tiny-mixtral", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    out = client.completions.create(model="tiny-mixtral", prompt="hi", max_tokens=2)
    assert out.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "remove, error, match",
    [
        (None, FileNotFoundError, "does not exist"),
        ("tokenizer.json", FileNotFoundError, "holds no tokenizer.json"),
        ("config.json", CheckpointError, "config.json"),
        ("model.safetensors", CheckpointError, "safetensors"),
    ],
)
def test_engine_start_up_errors_name_the_missing_part(checkpoint, tmp_path, remove, error, match):
    directory = tmp_path / "nowhere"
    if remove is not None:
        directory = write_hf_checkpoint(tmp_path / "ckpt")
        (directory / remove).unlink()
    with pytest.raises(error, match=match):
        Engine.from_hf(directory)


def test_serve_py_hf_prompt_and_start_up_error(checkpoint, hf_engine, tmp_path):
    args = ("--max-seq-len", CONTEXT, "--prompt", "The quick", "--max-tokens", 5)
    run = dict(capture_output=True, text=True, timeout=600, env=_env())
    out = subprocess.run(_serve("--hf", checkpoint, *args), check=True, **run)
    assert out.stdout == hf_engine.generate("The quick", max_tokens=5)[0].text + "\n"
    out = subprocess.run(_serve("--hf", tmp_path), **run)
    assert out.returncode != 0 and "tokenizer.json" in out.stderr
    assert "Traceback" not in out.stderr
