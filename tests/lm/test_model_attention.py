"""The LM's attention options end to end: GPT-OSS-style sinks, biases and per-layer sliding
windows against the NumPy reference, scan units of alternating layer types, the config checks,
and document boundaries in packed training (a packed window's loss is the sum of its documents'
losses; nothing crosses a boundary)."""

import dataclasses

import jax
import numpy as np
import pytest
from model_reference import ref_transformer
from test_model import _apply, _config, _grads, _init, _tokens

from jmoe.lm.config import ModelConfig
from jmoe.lm.mla import MLAConfig
from jmoe.lm.model import Transformer
from jmoe.lm.param_layout import LayerKind, layer_segments, stack_layers, unstack_layers
from jmoe.train import data, trainer
from jmoe.train.config import Config
from jmoe.train.run_config import load_config, save_config
from jmoe.train.tokenizer import ByteTokenizer

SLIDING, FULL = "sliding_attention", "full_attention"
DOCS = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 2]])


@pytest.mark.parametrize(
    "features, docs",
    [
        (dict(attention_sinks=True, o_bias=True, qkv_bias=True), None),
        (dict(attention_sinks=True, o_bias=True, attention_impl="plain"), DOCS),
        (dict(qkv_bias=True, attention_impl="dot_product"), DOCS),
    ],
    ids=["sinks_bias", "sinks_segments", "dot_product_segments"],
)
def test_sliding_layers_sinks_and_segments_match_reference(features, docs):
    cfg = _config(layer_types=(SLIDING, FULL, SLIDING), sliding_window=2, **features)
    variables = _init(cfg, bias_scale=0.05)
    tokens = _tokens(8)
    logits, _ = _apply(cfg, variables, tokens, segment_ids_BxS=docs)
    want = ref_transformer(variables, tokens, cfg, docs)
    np.testing.assert_allclose(logits, want, atol=2e-4)


def test_scan_of_alternating_layer_types_matches_unrolled():
    """Sliding / full pairs of MoE layers scan as one two-block unit; logits, per-layer stats
    (two MoE blocks per unit) and gradients equal the unrolled model's."""
    cfg = _config(n_layers=4, layer_types=(SLIDING, FULL) * 2, sliding_window=2)
    sliding, full = LayerKind(moe=True, window=2), LayerKind(moe=True)
    assert layer_segments(cfg) == [(0, 2, (sliding, full))]
    odd = dataclasses.replace(cfg, n_layers=5, layer_types=(FULL, SLIDING, SLIDING, FULL, FULL))
    assert layer_segments(odd) == [(0, 1, (full, sliding, sliding, full, full))]
    variables = _init(cfg, bias_scale=0.05)
    scanned = {k: stack_layers(cfg, v) for k, v in variables.items()}
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    tokens = _tokens(9)
    (value, (logits, stats)), grads = _grads(cfg, variables, tokens)
    (scan_value, (scan_logits, scan_stats)), scan_grads = _grads(scan_cfg, scanned, tokens)
    np.testing.assert_allclose(scan_value, value, rtol=1e-6)
    np.testing.assert_allclose(scan_logits, logits, atol=1e-5)
    assert stats["tokens_per_expert"].shape == (4, cfg.moe.num_experts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), scan_stats, stats)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        unstack_layers(cfg, scan_grads),
        grads,
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(layer_types=(SLIDING,) * 3), "sliding_window=None is invalid"),
        (dict(layer_types=(FULL,) * 2, sliding_window=4), "n_layers=3 entries"),
        (dict(layer_types=(FULL, "local", FULL), sliding_window=4), "n_layers=3 entries"),
        (dict(sliding_window=0), "sliding_window=0 is invalid"),
        (dict(attention_impl="flash"), "attention_impl='flash' is invalid"),
        (dict(mla=MLAConfig(8, 4, 6, 5), attention_sinks=True), "attention_sinks=True is invalid"),
        (dict(mla=MLAConfig(8, 4, 6, 5), attention_impl="dot_product"), "default with mla"),
    ],
)
def test_attention_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(n_layers=3, **overrides)


def test_layer_types_round_trip_through_yaml(tmp_path):
    model = ModelConfig(n_layers=2, layer_types=[SLIDING, FULL], sliding_window=8)
    assert model.layer_types == (SLIDING, FULL) and model.layer_window(0) == 8
    assert model.layer_window(1) is None
    config = Config(model=model)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_packed_window_loss_is_the_sum_of_document_losses():
    """A packed batch from the data pipeline through `eval_step`: its summed loss equals the sum
    over its documents run alone (each right-padded in a batch of its own), and changing one
    document's tokens leaves every other document's logits unchanged."""
    cfg = _config(vocab_size=260, n_layers=2, layer_types=(SLIDING, FULL), sliding_window=3)
    variables = _init(cfg, bias_scale=0.05)
    docs = ["ab", "cdefg", "h", "ijklmnopq", "rst", "uvwxyz0123"]
    kwargs = dict(seq_len=8, batch_size=3, seed=0, shuffle=False)
    batch = next(data.make_iterator(docs, ByteTokenizer(), **kwargs))
    inputs, targets, segments = batch["inputs"], batch["targets"], batch["segment_ids"]
    assert (segments != segments[:, :1]).any(axis=1).all()  # every row packs 2+ documents
    state = trainer.TrainState(variables["params"], {}, variables["moe_state"], 0, 0, 0)
    packed_sum, count = jax.jit(trainer.make_eval_step(Transformer(cfg)))(state, batch)
    assert count == inputs.size

    pieces = [
        (b, np.flatnonzero(segments[b] == doc))
        for b in range(len(inputs))
        for doc in set(segments[b])
    ]
    alone = np.zeros((len(pieces), inputs.shape[1]), np.int32)
    alone_targets, alone_mask = np.zeros_like(alone), np.zeros(alone.shape, bool)
    for p, (b, cols) in enumerate(pieces):
        n = len(cols)
        alone[p, :n], alone_targets[p, :n], alone_mask[p, :n] = inputs[b, cols], targets[b, cols], 1
    logits, _ = _apply(cfg, variables, alone)
    alone_sum, alone_count = trainer.cross_entropy(logits, alone_targets, alone_mask)
    assert alone_count == count
    np.testing.assert_allclose(packed_sum, alone_sum, rtol=1e-5)

    packed_logits, _ = _apply(cfg, variables, inputs, segment_ids_BxS=segments)
    changed = inputs.copy()
    first = segments == segments[:, :1]
    changed[first] = (changed[first] + 1) % 256  # new bytes, never the end-of-text id
    changed_logits, _ = _apply(cfg, variables, changed, segment_ids_BxS=segments)
    np.testing.assert_array_equal(changed_logits[~first], packed_logits[~first])
    assert not np.allclose(changed_logits[first], packed_logits[first])


@pytest.mark.parametrize(
    "overrides",
    [dict(attention_sinks=True), dict(mla=MLAConfig(8, 4, 6, 5))],
    ids=["gqa_sinks", "mla"],
)
def test_packed_documents_equal_documents_alone(overrides):
    """Two documents packed in one row give the logits of each document run alone (each
    right-padded in a batch of its own: causal attention never sees the padding)."""
    cfg = _config(n_layers=2, **overrides)
    variables = _init(cfg, bias_scale=0.05)
    tokens = _tokens(12)
    segments = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
    packed, _ = _apply(cfg, variables, tokens, segment_ids_BxS=segments)
    pieces = [(b, cols) for b, cut in enumerate((4, 2)) for cols in (slice(0, cut), slice(cut, 6))]
    alone_tokens = np.zeros((len(pieces), 6), np.int32)
    for p, (b, cols) in enumerate(pieces):
        alone_tokens[p, : cols.stop - cols.start] = tokens[b, cols]
    alone, _ = _apply(cfg, variables, alone_tokens)
    for p, (b, cols) in enumerate(pieces):
        n = cols.stop - cols.start
        np.testing.assert_allclose(packed[b, cols], alone[p, :n], atol=1e-5)
