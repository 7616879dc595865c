"""A quantized model saved with `save_compressed` is a run directory like any other:
`load_run` restores it bit for bit, `Engine.from_run` decodes it greedily exactly as its own
forward pass does, and mostly as the float model does. Bad saves leave nothing behind."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.compress.quantize import quantize_experts
from jmoe.compress.save import RECORD_FILE, save_compressed
from jmoe.lm.model import Transformer
from jmoe.serve.engine import Engine
from jmoe.serve.runs import load_run
from jmoe.train.checkpoint import CONFIG_FILE
from jmoe.train.run_config import load_config, save_config
from jmoe.train.tokenizer import ByteTokenizer

# A 2-layer, 4-expert top-2 MoE LM over bytes (257 symbols; the model has 3 rows more).
TINY = [
    "model.vocab_size=260",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "model.moe.d_ff=32",
    "model.moe.num_experts=4",
    "data.seq_len=32",
]
VOCAB = 257
PROMPTS = ["def f(", "import os", "class A:", "x = [1, "]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """`(run directory with config.yaml and tokenizer/, config, float variables)`."""
    directory = tmp_path_factory.mktemp("source") / "tiny"
    directory.mkdir()
    config = load_config(None, TINY)
    save_config(config, directory / CONFIG_FILE)
    ByteTokenizer().save(directory / "tokenizer")
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(Transformer(config.model).init)(jax.random.key(1), tokens)
    return directory, config, variables


def _greedy(config, variables, prompts, max_tokens):
    """Token-by-token argmax of the full forward pass (no KV cache) over the byte vocabulary."""
    apply = jax.jit(lambda v, t: Transformer(config).apply(v, t)[0])
    rows = [ByteTokenizer().encode_prompt(p) for p in prompts]
    for _ in range(max_tokens):
        tokens = np.zeros((len(rows), config.max_seq_len), np.int32)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)] = ids
        logits = np.asarray(apply(variables, tokens))
        for r, ids in enumerate(rows):
            ids.append(int(np.argmax(logits[r, len(ids) - 1, :VOCAB])))
    return [ids[-max_tokens:] for ids in rows]


def test_saved_quantized_run_loads_and_decodes(source_run, tmp_path):
    directory, config, variables = source_run
    q_config, q_vars = quantize_experts(config.model, variables, "int8")
    out = save_compressed(directory, tmp_path / "tiny-int8", q_config, q_vars, note="int8 experts")
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["note"] == "int8 experts" and record["expert_quantization"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-int8"]  # no temporary left

    run = load_run(out)
    assert run.config.model == q_config and run.config.data == config.data
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(got, np.asarray(want), strict=True),
        run.variables,
        {"params": q_vars["params"], "moe_state": q_vars["moe_state"]},
    )
    engine = Engine.from_run(out, num_slots=4, smallest_cache=32)
    assert engine.name == "tiny-int8"
    got = [list(c.token_ids) for c in engine.generate(PROMPTS, max_tokens=MAX_TOKENS)]
    # 1. The engine (KV cache, batched slots) decodes the quantized model as its forward does.
    assert got == _greedy(q_config, q_vars, PROMPTS, MAX_TOKENS)
    # 2. Mostly as the float model does: a near tie between two tokens may flip a completion
    #    (measured on this model: 4 of 4 completions identical under int8, 2 of 4 under fp8).
    float_ids = _greedy(config.model, variables, PROMPTS, MAX_TOKENS)
    assert sum(a == b for a, b in zip(got, float_ids, strict=True)) >= 3


def test_bad_saves_write_nothing(source_run, tmp_path):
    directory, config, variables = source_run
    q_config, _ = quantize_experts(config.model, variables, "fp8")
    with pytest.raises(ValueError, match="w_up: .*float32.*float8_e4m3fn"):
        save_compressed(directory, tmp_path / "bad", q_config, variables)  # float weights
    assert list(tmp_path.iterdir()) == []
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_compressed(directory, taken, config.model, variables)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        save_compressed(tmp_path / "taken", tmp_path / "new", config.model, variables)


def test_a_save_failing_midway_leaves_nothing(source_run, tmp_path, monkeypatch):
    from jmoe.compress import save

    def broken(*args, **kwargs):
        raise OSError("disk full")

    directory, config, variables = source_run
    monkeypatch.setattr(save.Checkpointer, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(directory, tmp_path / "out", config.model, variables)
    assert list(tmp_path.iterdir()) == []
