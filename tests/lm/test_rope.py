"""jmoe.lm.rope: YaRN frequencies and scales against the formula in NumPy, and the interleaved
layout's permutation."""

import math

import jax
import numpy as np
import pytest
from mla_reference import ref_rotate, ref_yarn
from model_reference import ref_rope

from jmoe.lm.attention import Attention
from jmoe.lm.rope import (
    YarnScaling,
    interleaved_to_half_permutation,
    inverse_frequencies,
    rope,
    yarn_mscale,
)


@pytest.mark.parametrize(
    "dim, theta, factor, length, betas, truncate",
    [
        (64, 10000.0, 40.0, 4096, (32.0, 1.0), True),  # DeepSeek-V3-like rope part
        (64, 150000.0, 32.0, 4096, (32.0, 1.0), False),  # GPT-OSS-like, no truncation
        (16, 10000.0, 4.0, 64, (8.0, 2.0), True),
        (16, 10000.0, 4.0, 64, (8.0, 2.0), False),
        (8, 10000.0, 1.0, 64, (32.0, 1.0), True),  # factor 1: the plain frequencies
        (16, 500.0, 8.0, 8, (32.0, 1.0), True),  # short context: the ramp clamps at index 0
        (16, 10000.0, 8.0, 1 << 28, (32.0, 1.0), True),  # long context: clamps at dim - 1
        (32, 10000.0, 4.0, 2048, (4.0, 4.0), False),  # equal bounds: a step, no division by 0
    ],
)
def test_yarn_frequencies_match_formula(dim, theta, factor, length, betas, truncate):
    scaling = YarnScaling(factor, length, *betas, truncate=truncate)
    got = np.asarray(inverse_frequencies(dim, theta, scaling))
    want = ref_yarn(dim, theta, factor, length, *betas, truncate=truncate)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    base = theta ** (-2.0 * np.arange(dim // 2) / dim)
    np.testing.assert_allclose(np.asarray(inverse_frequencies(dim, theta)), base, rtol=2e-6)
    if factor == 1.0:
        np.testing.assert_allclose(got, base, rtol=2e-6)
    else:  # the fastest frequency is kept, the slowest interpolated
        assert got[0] == pytest.approx(base[0], rel=1e-6)
        assert got[-1] == pytest.approx(base[-1] / factor, rel=1e-5) or length > 1e5


def test_yarn_ramp_is_used_between_its_bounds():
    """A case whose bounds fall inside the head, so some frequencies are truly blended."""
    scaling = YarnScaling(16.0, 4096)
    low, high = scaling.correction_range(64, 10000.0)
    assert 0 < low < high < 31
    got = np.asarray(inverse_frequencies(64, 10000.0, scaling))
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    ratio = base / got
    assert np.all(ratio[: int(low) + 1] == pytest.approx(1.0))
    assert np.all(ratio[int(high) :] == pytest.approx(16.0))
    assert np.all((ratio[int(low) + 1 : int(high)] > 1) & (ratio[int(low) + 1 : int(high)] < 16))


@pytest.mark.parametrize(
    "fields, want_attention, want_softmax",
    [
        (dict(factor=40.0), 0.1 * math.log(40) + 1, 1.0),
        (dict(factor=40.0, mscale=0.707), 0.1 * math.log(40) + 1, 1.0),  # needs mscale_all_dim
        (
            dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0),  # DeepSeek-V3
            1.0,
            (0.1 * math.log(40) + 1) ** 2,
        ),
        (
            dict(factor=40.0, mscale=0.707, mscale_all_dim=0.5),
            (0.0707 * math.log(40) + 1) / (0.05 * math.log(40) + 1),
            (0.05 * math.log(40) + 1) ** 2,
        ),
        (dict(factor=1.0, mscale=0.7, mscale_all_dim=0.3), 1.0, 1.0),  # no extension
        (dict(factor=0.5), 1.0, 1.0),
        (dict(factor=40.0, mscale_all_dim=1.0, attention_factor=1.3), 1.3, 2.0**0),
    ],
)
def test_yarn_scales(fields, want_attention, want_softmax):
    scaling = YarnScaling(original_max_position_embeddings=4096, **fields)
    assert scaling.attention_factor_value == pytest.approx(want_attention)
    if "attention_factor" not in fields:
        assert scaling.softmax_scale_factor == pytest.approx(want_softmax)
    assert yarn_mscale(1.0, 5.0) == 1.0 and yarn_mscale(math.e, 2.0) == pytest.approx(1.2)


def test_rope_with_yarn_rotates_by_blended_frequencies_and_scales():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 16), np.float32)
    positions = np.array([np.arange(5), np.arange(5) * 97 + 1000])
    scaling = YarnScaling(8.0, 64, beta_fast=8.0, beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5)
    got = np.asarray(rope(x, positions, 100.0, scaling))
    freq = ref_yarn(16, 100.0, 8.0, 64, 8.0, 2.0)
    factor = (0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1)
    for b in range(2):
        for h in range(3):
            z = x[b, :, h, :8] + 1j * x[b, :, h, 8:]
            z = z * np.exp(1j * positions[b][:, None] * freq[None]) * factor
            want = np.concatenate([z.real, z.imag], axis=-1)
            np.testing.assert_allclose(got[b, :, h], want, atol=2e-4, rtol=1e-4)
    # Without scaling, rope is the plain rotation.
    np.testing.assert_allclose(
        np.asarray(rope(x, positions, 100.0))[1, :, 2],
        ref_rope(x[1, :, 2], positions[1], 100.0),
        atol=2e-4,
    )


def _rope_interleaved(x_SxA, positions_S, theta):
    """RoPE rotating the neighbour pairs (x_2i, x_2i+1) by `pos * theta**(-2i/A)`."""
    a = x_SxA.shape[-1]
    z = x_SxA[:, 0::2] + 1j * x_SxA[:, 1::2]
    z = z * np.exp(1j * positions_S[:, None] * theta ** (-2.0 * np.arange(a // 2) / a))
    out = np.empty_like(x_SxA, dtype=np.float64)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


@pytest.mark.parametrize("dim", [2, 8, 12])
def test_interleaved_permutation_turns_pairs_into_halves(dim):
    rng = np.random.default_rng(dim)
    perm = interleaved_to_half_permutation(dim)
    assert sorted(perm) == list(range(dim))
    positions = np.array([0, 3, 17, 250])
    q = rng.standard_normal((4, dim), np.float32)
    half = np.asarray(rope(q[None, :, None, perm], positions[None], 1000.0))[0, :, 0]
    inter = _rope_interleaved(q.astype(np.float64), positions, 1000.0)
    np.testing.assert_allclose(half, inter[:, perm], atol=1e-5)
    # The permutation of the weights cancels in the attention scores.
    x = rng.standard_normal((4, 5))
    w_q, w_k = rng.standard_normal((2, 5, dim))

    def rot(w_DxA):
        y_1xSx1xA = (x @ w_DxA).astype(np.float32)[None, :, None]
        return np.asarray(rope(y_1xSx1xA, positions[None], 1000.0))[0, :, 0]

    half_scores = rot(w_q[:, perm]) @ rot(w_k[:, perm]).T
    inter_scores = (
        _rope_interleaved(x @ w_q, positions, 1000.0)
        @ _rope_interleaved(x @ w_k, positions, 1000.0).T
    )
    np.testing.assert_allclose(half_scores, inter_scores, atol=1e-4, rtol=1e-4)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="dim=5 must be an even integer"):
        interleaved_to_half_permutation(5)
    for fields, fragment in [
        (dict(factor=0.0), "YarnScaling.factor=0.0"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings=0"),
        (dict(beta_slow=0.0), "beta_slow=0.0"),
        (dict(beta_fast=0.5), "beta_fast=0.5 is invalid: must be a number >= beta_slow=1.0"),
        (dict(mscale_all_dim=-1.0), "mscale_all_dim=-1.0"),
        (dict(attention_factor=0.0), "attention_factor=0.0"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            YarnScaling(**{"factor": 4.0, "original_max_position_embeddings": 64, **fields})


def test_attention_rotates_with_yarn():
    """Grouped-query attention passes its `rope_scaling` on: head by head, the output is softmax
    attention over queries and keys turned by YaRN's frequencies and scaled by its factor."""
    rng = np.random.default_rng(5)
    h, g, a, d, s = 4, 2, 8, 12, 5
    scaling = YarnScaling(8.0, 16, beta_fast=4.0, beta_slow=1.0)
    module = Attention(h, g, a, 100.0, rope_scaling=scaling)
    x = rng.standard_normal((1, s, d)).astype(np.float32)
    positions = np.arange(s)[None] + 30
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, positions)["params"]
    params = jax.tree.map(
        lambda leaf: 0.3 * rng.standard_normal(leaf.shape).astype(np.float32), shapes
    )
    out, _ = jax.jit(module.apply)({"params": params}, x, positions)
    w = {n: np.asarray(params[n]["kernel"], np.float64) for n in ("q", "k", "v", "o")}
    freq = ref_yarn(a, 100.0, 8.0, 16, 4.0, 1.0)
    magnitude = 0.1 * math.log(8.0) + 1
    want = np.zeros((s, d))
    for head in range(h):
        kv = head // (h // g)
        q = ref_rotate(x[0] @ w["q"][:, head], positions[0], freq, magnitude)
        k = ref_rotate(x[0] @ w["k"][:, kv], positions[0], freq, magnitude)
        scores = np.where(np.tri(s, dtype=bool), q @ k.T / np.sqrt(a), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        want += (probs / probs.sum(-1, keepdims=True)) @ (x[0] @ w["v"][:, kv]) @ w["o"][head]
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=2e-4, rtol=2e-4)
