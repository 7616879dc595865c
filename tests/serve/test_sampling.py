"""jmoe.serve.sampling against exact probabilities computed in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.serve.sampling import (
    InvalidRequestError,
    SamplingParams,
    choice_seeds,
    filtered_logits,
    penalized_logits,
    sample,
    token_logprobs,
)


def ref_probs(logits, temperature, top_k, top_p):
    """The sampling distribution written from its definition: temperature, then the k most
    likely tokens, then the smallest most-likely prefix whose mass reaches top_p."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    k = len(z) if top_k is None else top_k
    candidates = order[:k]
    p = np.exp(z[candidates] - z[candidates].max())
    p /= p.sum()
    mass = 0.0
    for token, prob in zip(candidates, p, strict=True):
        keep[token] = True
        mass += prob
        if mass >= top_p:
            break
    out = np.where(keep, np.exp(z - z.max()), 0.0)
    return out / out.sum()


def _rows(n, temperature, top_k, top_p):
    return (
        jnp.full(n, temperature, jnp.float32),
        jnp.full(n, top_k or 0, jnp.int32),
        jnp.full(n, top_p, jnp.float32),
    )


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, 1.0), (0.7, None, 1.0), (1.5, 3, 1.0), (1.0, None, 0.6), (0.8, 4, 0.7)],
)
def test_draws_follow_the_exact_distribution(temperature, top_k, top_p):
    logits = np.array([1.2, -0.3, 0.4, 2.0, -1.1, 0.9], np.float32)
    want = ref_probs(logits, temperature, top_k, top_p)
    n = 40_000
    draws = jax.jit(sample)(
        jnp.broadcast_to(logits, (n, len(logits))),
        *_rows(n, temperature, top_k, top_p),
        jnp.full(n, 1234, jnp.uint32),
        jnp.arange(n, dtype=jnp.int32),  # the n-th token of one request: independent draws
    )
    freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
    assert np.all(freq[want == 0] == 0)  # filtered tokens are never drawn
    sigma = np.sqrt(want * (1 - want) / n)
    np.testing.assert_array_less(np.abs(freq - want), 5 * sigma + 1e-9)


def test_filtered_logits_match_the_reference_on_random_rows():
    rng = np.random.default_rng(0)
    b, v = 64, 11
    logits = rng.normal(size=(b, v)).astype(np.float32) * 2
    temperature = rng.uniform(0.3, 2.0, b).astype(np.float32)
    top_k = rng.integers(0, v + 3, b).astype(np.int32)  # 0: no limit; > V: no limit either
    top_p = rng.uniform(0.05, 1.0, b).astype(np.float32)
    top_p[:8] = 1.0
    got = jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), axis=-1)
    for r in range(b):
        k = None if top_k[r] == 0 else min(int(top_k[r]), v)
        want = ref_probs(logits[r], temperature[r], k, float(top_p[r]))
        np.testing.assert_allclose(np.asarray(got[r]), want, atol=1e-5)


def test_temperature_zero_is_argmax_whatever_top_k_and_top_p():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(16, 9)), jnp.float32)
    ids = sample(logits, *_rows(16, 0.0, 2, 0.1), jnp.arange(16, dtype=jnp.uint32),
                 jnp.zeros(16, jnp.int32))  # fmt: skip
    np.testing.assert_array_equal(ids, np.argmax(np.asarray(logits), axis=-1))


def test_same_seed_and_counter_give_the_same_token():
    logits = jnp.zeros((4, 50), jnp.float32)  # uniform: any difference in the keys shows
    seeds = jnp.asarray([7, 7, 8, 7], jnp.uint32)
    counters = jnp.asarray([0, 0, 0, 1], jnp.int32)
    ids = np.asarray(sample(logits, *_rows(4, 1.0, None, 1.0), seeds, counters))
    assert ids[0] == ids[1]
    assert len({ids[0], ids[2], ids[3]}) == 3  # another seed, another position: other draws


def test_token_logprobs_are_the_log_softmax():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7)), jnp.float32)
    ids = jnp.asarray([0, 3, 6], jnp.int32)
    chosen, top_ids, top_lp = token_logprobs(logits, ids, num_top=2)
    want = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(chosen, want[jnp.arange(3), ids], rtol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-np.asarray(want), axis=-1)[:, :2])
    np.testing.assert_allclose(top_lp, np.sort(np.asarray(want), axis=-1)[:, ::-1][:, :2])


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", -1),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("stop", [""]),
        ("seed", -3),
        ("logprobs", 6),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", "1"),
    ],
)
def test_params_name_the_bad_field(field, value):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_penalized_logits_follow_the_openai_definition():
    rng = np.random.default_rng(3)
    b, v = 6, 13
    logits = rng.normal(size=(b, v)).astype(np.float32)
    counts = rng.integers(0, 4, (b, v)).astype(np.int32) * (rng.random((b, v)) < 0.4)
    presence = rng.uniform(-2, 2, b).astype(np.float32)
    frequency = rng.uniform(-2, 2, b).astype(np.float32)
    got = np.asarray(penalized_logits(logits, counts, presence, frequency))
    for r in range(b):
        for j in range(v):  # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
            want = (
                logits[r, j] - counts[r, j] * frequency[r] - float(counts[r, j] > 0) * presence[r]
            )
            np.testing.assert_allclose(got[r, j], want, rtol=1e-6, atol=1e-6)
    zero = np.zeros(b, np.float32)
    np.testing.assert_array_equal(penalized_logits(logits, counts, zero, zero), logits)


def test_choice_seeds_keep_the_first_and_derive_the_rest():
    seeds = choice_seeds(7, 4)
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert all(0 <= s < 2**32 for s in seeds)
    assert choice_seeds(7, 2) == seeds[:2]  # a choice's seed does not depend on n
    assert choice_seeds(8, 4)[1:] != seeds[1:]
    assert choice_seeds(None, 3) == [None] * 3
