"""Thin adapter from the shared shape catalogue (`jmoe.catalogue`) to the kernel tests.

`pallas_kernels` never imports jmoe; its tests take the group-size cases from the catalogue here,
plus dtype-keyed tolerances and small random inputs.
"""

import jax.numpy as jnp
import numpy as np

from jmoe import catalogue

M, G, K, N = 64, 4, 16, 24  # rows, groups, contracted and output widths
TM = 16  # rows per tile in the tests: 4 row tiles, so shared and skipped tiles both occur
GS_CASES = catalogue.group_size_cases(M, G)
BACKENDS = ("tpu", "gpu")
BACKEND_IDS = ("mosaic", "triton")  # not "tpu" / "gpu": conftest skips tests with those keywords
DTYPES = (jnp.float32, jnp.bfloat16)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference magnitude


def inputs(seed: int, *shapes, dtype=jnp.float32):
    """Standard-normal arrays of the given shapes in `dtype`."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def close(actual, expected, dtype, err_msg=""):
    """`actual ~ expected` within the dtype's tolerance, scaled by the reference's magnitude."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=err_msg)


def group_loop(x, w, gs):
    """NumPy float64 per-group loop: `y[rows of g] = x[rows of g] @ w[g]`, zeros elsewhere."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[2]))
    ends = np.cumsum(gs)
    for g, (s, e) in enumerate(zip(ends - gs, ends, strict=True)):
        y[s:e] = x[s:e] @ w[g]
    return y
