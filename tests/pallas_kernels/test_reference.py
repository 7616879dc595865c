"""The jnp references (the kernels' oracle) against NumPy float64 loops, so the oracle is
itself checked by something independent of JAX."""

import math

import numpy as np
import pytest
from kernel_cases import GS_CASES, G, K, M, N, group_loop

from pallas_kernels import reference


def _rng_inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("case", list(GS_CASES))
def test_gmm_tgmm_swiglu(case):
    gs = GS_CASES[case]
    x, w, wu, dy = _rng_inputs(0, (M, K), (G, K, N), (G, K, N), (M, N))
    np.testing.assert_allclose(reference.gmm(x, w, gs), group_loop(x, w, gs), rtol=1e-5, atol=1e-4)
    ends = np.cumsum(gs)
    for g, (s, e) in enumerate(zip(ends - gs, ends, strict=True)):
        expected = x[s:e].astype(np.float64).T @ dy[s:e]
        np.testing.assert_allclose(reference.tgmm(x, dy, gs)[g], expected, rtol=1e-5, atol=1e-4)
    gate, up = group_loop(x, w, gs), group_loop(x, wu, gs)
    silu = gate / (1.0 + np.exp(-gate))
    np.testing.assert_allclose(reference.swiglu(x, w, wu, gs), silu * up, rtol=1e-4, atol=1e-3)


def test_gmm_local_groups_and_transpose():
    gs = np.array([3, 4, 5, 6], np.int32)
    x, w = _rng_inputs(1, (M, K), (2, N, K))
    y = np.asarray(reference.gmm(x, w, gs, group_offset=1, transpose_rhs=True))
    np.testing.assert_allclose(y[3:7], x[3:7] @ w[0].T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y[7:12], x[7:12] @ w[1].T, rtol=1e-5, atol=1e-4)
    assert not y[:3].any() and not y[12:].any()


def test_top_k_gating_per_token():
    x, w = _rng_inputs(2, (7, K), (K, 5))
    bias = np.array([0.0, 0.3, 0.0, -0.2, 0.1], np.float32)
    ids, weights, counts, probs, _ = reference.top_k_gating(
        x, w, 2, score="sigmoid", bias=bias, normalize=True, scale=2.0
    )
    for t in range(7):
        p = [1.0 / (1.0 + math.exp(-float(v))) for v in x[t].astype(np.float64) @ w]
        order = sorted(range(5), key=lambda e: (-(p[e] + bias[e]), e))[:2]
        assert ids[t].tolist() == order
        total = p[order[0]] + p[order[1]]
        np.testing.assert_allclose(weights[t], [2 * p[e] / total for e in order], rtol=1e-5)
        np.testing.assert_allclose(probs[t], p, rtol=1e-5)
    assert counts.tolist() == np.bincount(np.ravel(ids), minlength=5).tolist()
