"""`jmoe.compress.router_stats` against a plain loop over tokens, and `calibration_tokens`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.compress.calibration import CALIBRATION_SETS, calibration_texts, calibration_tokens
from jmoe.compress.router_stats import RouterStats, router_stats, stats_from_routings, stats_path
from jmoe.compress.trace import layer_routings
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe import routing
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import NullExperts
from jmoe.train.tokenizer import ByteTokenizer

E = 5


def reference_stats(steps, mask_T, num_experts, top_k, r):
    """One layer's statistics by a loop over steps, tokens and slots."""
    picks, weight_sum, tcess = np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts)
    null_picks, tokens = 0, 0
    for step in steps:
        ids, valid, weights = map(np.asarray, (step.expert_ids, step.valid, step.weights))
        probs = np.asarray(step.probs, np.float64)
        choices = None if step.choices is None else np.asarray(step.choices)
        tokens = 0
        for t in range(len(ids)):
            if not mask_T[t]:
                continue
            tokens += 1
            for s in range(ids.shape[1]):
                if choices is not None and choices[t, s] >= num_experts:
                    null_picks += 1
                elif valid[t, s]:
                    picks[ids[t, s]] += 1
                    weight_sum[ids[t, s]] += weights[t, s]
            top = sorted(range(probs.shape[1]), key=lambda j: (-probs[t, j], j))[:top_k]
            total = sum(probs[t, j] for j in top)
            for j in top:
                if j < num_experts and probs[t, j] / total >= r:
                    tcess[j] += probs[t, j] / total
    all_picks = picks.sum() + null_picks
    mean_weight = [w / n if n else 0.0 for w, n in zip(weight_sum, picks, strict=True)]
    return (
        picks / all_picks,
        np.array(mean_weight),
        tcess / (tokens * len(steps)),
        null_picks / all_picks,
    )


def _logits(seed, t=24, columns=E):
    logits = np.random.default_rng(seed).normal(size=(t, columns)) * 2
    logits[:, 3] = -30.0  # expert 3: nobody picks it
    return jnp.asarray(logits, jnp.float32)


ROUTINGS = {
    "top_k": lambda seed: routing.top_k(_logits(seed), 2, normalize=True),
    "sigmoid": lambda seed: routing.top_k(_logits(seed), 2, score="sigmoid"),
    "null": lambda seed: routing.null_experts(_logits(seed, columns=E + 3), 3, num_null=3),
    "top_p": lambda seed: routing.top_p(_logits(seed), 0.6),
    "expert_choice": lambda seed: routing.expert_choice(_logits(seed), 6),
}


@pytest.mark.parametrize("kind", sorted(ROUTINGS))
@pytest.mark.parametrize("chain_steps", [1, 2])
def test_every_statistic_matches_a_loop_over_tokens(kind, chain_steps):
    mask_T = np.random.default_rng(7).random(24) > 0.3  # padding masked out
    layers = {i: tuple(ROUTINGS[kind](10 * i + c) for c in range(chain_steps)) for i in (0, 2)}
    top_k, r = 3, 0.3
    stats = stats_from_routings(layers, mask_T, num_experts=E, top_k=top_k, confidence=r)
    assert stats.layers == (0, 2) and stats.num_tokens == mask_T.sum()
    for row, layer in enumerate((0, 2)):
        want = reference_stats(layers[layer], mask_T, E, top_k, r)
        for got, ref in zip(
            (stats.frequency, stats.mean_weight, stats.tcess, stats.null_frequency),
            want,
            strict=True,
        ):
            np.testing.assert_allclose(got[row], ref, rtol=1e-6, atol=1e-9)
        if kind != "expert_choice":  # (an expert of expert choice always takes its tokens)
            assert stats.frequency[row, 3] == stats.mean_weight[row, 3] == stats.tcess[row, 3] == 0
    total = stats.frequency.sum(1) + stats.null_frequency
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    assert (stats.null_frequency > 0).all() == (kind == "null")


def test_a_threshold_of_one_keeps_only_sole_confident_picks_and_bad_thresholds_raise():
    steps = (routing.top_k(_logits(0), 2),)
    mask_T = np.ones(24, bool)
    assert not stats_from_routings(
        {0: steps}, mask_T, num_experts=E, top_k=2, confidence=1.0
    ).tcess.any()
    top1 = stats_from_routings({0: steps}, mask_T, num_experts=E, top_k=1, confidence=1.0)
    np.testing.assert_allclose(top1.tcess.sum(), 1.0)  # top-1: every token's pick counts fully
    with pytest.raises(ValueError, match="confidence"):
        stats_from_routings({0: steps}, mask_T, num_experts=E, top_k=2, confidence=1.5)


def _model(router, chain_steps=1):
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=4, router=router, chain_steps=chain_steps)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=16, moe=moe)
    tokens = (jnp.arange(24).reshape(2, 12) * 7) % 32
    return config, jax.jit(Transformer(config).init)(jax.random.key(1), tokens), tokens


def test_router_stats_of_a_model_match_the_loop_on_its_routings(tmp_path):
    chain_steps = 2  # a chain of null-expert routers: every step and every null pick counts
    config, variables, tokens = _model(NullExperts(k=2, num_null=2), chain_steps)
    mask = np.ones(tokens.shape, bool)
    mask[1, 8:] = False
    stats = router_stats(config, variables, tokens, mask, confidence=0.2, source="unit")
    routings = layer_routings(config, variables, tokens, mask)
    for row, layer in enumerate(stats.layers):
        assert len(routings[layer]) == chain_steps
        want = reference_stats(routings[layer], mask.reshape(-1), 4, 2, 0.2)
        np.testing.assert_allclose(stats.frequency[row], want[0], rtol=1e-6)
        np.testing.assert_allclose(stats.tcess[row], want[2], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.null_frequency[row], want[3], rtol=1e-6)
    path = stats.save(stats_path(tmp_path, "unit"))
    assert path == tmp_path / "router_stats" / "unit.json"
    loaded = RouterStats.load(path)
    for field in dataclasses.fields(RouterStats):
        np.testing.assert_array_equal(getattr(loaded, field.name), getattr(stats, field.name))


def test_calibration_sets_exist_and_unknown_names_list_the_known_ones():
    for name in CALIBRATION_SETS:
        texts = calibration_texts(name)
        assert texts and all(isinstance(text, str) and text for text in texts)
    assert not any("class TestCase(unittest.TestCase)" in t for t in calibration_texts("json"))
    with pytest.raises(ValueError, match="asyncio"):
        calibration_tokens("no_such_set", ByteTokenizer(), seq_len=8, max_sequences=2)


def test_calibration_tokens_pack_the_stream_and_pad_the_last_window():
    tok = ByteTokenizer()
    tokens, mask = calibration_tokens(["abcde", "xy"], tok, seq_len=4, max_sequences=8)
    stream = [*b"abcde", 256, *b"xy", 256]
    assert tokens.shape == mask.shape == (3, 4)
    np.testing.assert_array_equal(tokens.reshape(-1)[mask.reshape(-1)], stream)
    np.testing.assert_array_equal(mask.sum(1), [4, 4, 1])
    long_text = ["".join(chr(97 + i % 26) for i in range(100))]  # 101 tokens: 26 windows of 4
    tokens, mask = calibration_tokens(long_text, tok, seq_len=4, max_sequences=3)
    np.testing.assert_array_equal(tokens[:, 0], [97, 97 + 48 % 26, 256])  # windows 0, 12, 25
    assert mask.sum() == 9
    with pytest.raises(ValueError, match="no text"):
        calibration_tokens(["", ""], tok, seq_len=4, max_sequences=1)
