"""Shared fixtures of the serving tests: a tiny random model saved as a real `train.py` run
directory, one warmed-up engine on it, and a live HTTP server on a free localhost port."""

from __future__ import annotations

import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from jmoe.lm.model import Transformer
from jmoe.serve.app import create_app
from jmoe.serve.engine import Engine
from jmoe.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, Checkpointer
from jmoe.train.run_config import load_config, save_config
from jmoe.train.tokenizer import ByteTokenizer
from jmoe.train.trainer import init_state, make_optimizer

# A 2-layer, 4-expert top-2 MoE LM over bytes. The model has 3 vocabulary rows more than the
# byte tokenizer's 257 symbols; the engine must never produce them.
TINY = [
    "model.vocab_size=260",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=64",
    "model.moe.d_ff=32",
    "model.moe.num_experts=4",
    "data.seq_len=64",
]
TOKENIZER_VOCAB = 257
SLOTS = 4
MAX_QUEUE = 16
API_KEY = "test-key"


def write_run(directory, overrides=TINY, step=3):
    """A run directory as train.py leaves it: config.yaml, tokenizer/, checkpoints/<step>/ (a
    full train state: params, optimizer moments, MoE state, step, RNG)."""
    config = load_config(None, overrides)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(config, directory / CONFIG_FILE)
    ByteTokenizer().save(directory / "tokenizer")
    state = init_state(config, Transformer(config.model), make_optimizer(config.train))
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    checkpointer = Checkpointer(directory / CHECKPOINT_DIR, max_to_keep=1)
    checkpointer.save(step, state, {"next_index": 0})
    checkpointer.wait()
    checkpointer.close()
    return config, state


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """`(run directory, config, saved train state)` of the tiny model."""
    directory = tmp_path_factory.mktemp("runs") / "tiny-run"
    config, state = write_run(directory)
    return directory, config, state


@pytest.fixture(scope="session")
def engine(run):
    """One warmed-up engine of the run, shared by the engine and server tests."""
    engine = Engine.from_run(run[0], num_slots=SLOTS, max_queue=MAX_QUEUE)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def forward(run):
    """Greedy reference: token-by-token argmax of the full forward pass (no KV cache)."""
    _, config, state = run
    model = Transformer(config.model)
    length = config.model.max_seq_len
    apply = jax.jit(lambda params, moe_state, tokens: model.apply(
        {"params": params, "moe_state": moe_state}, tokens)[0])  # fmt: skip

    def logits_of(ids_rows):
        """`[rows, max_seq_len, V]` logits of right-padded rows (causal: padding is unseen)."""
        tokens = np.zeros((len(ids_rows), length), np.int32)
        for r, ids in enumerate(ids_rows):
            tokens[r, : len(ids)] = ids
        return np.asarray(apply(state.params, state.moe_state, tokens))

    def greedy(prompts, max_tokens):
        rows = [list(p) for p in prompts]
        for _ in range(max_tokens):
            logits = logits_of(rows)
            for r, ids in enumerate(rows):
                ids.append(int(np.argmax(logits[r, len(ids) - 1, :TOKENIZER_VOCAB])))
        return [ids[len(p) :] for ids, p in zip(rows, prompts, strict=True)]

    greedy.logits_of = logits_of
    return greedy


class LiveServer:
    """uvicorn serving `app` from a background thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(engine):
    """The engine behind a live HTTP server that requires `API_KEY`."""
    live = LiveServer(create_app(engine, api_key=API_KEY))
    yield live
    live.stop()
