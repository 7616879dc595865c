"""Thin adapter from the shared shape catalogue (`tests/shape_cases.py`) to the kernel tests.

`pallas_kernels` never imports jmoe; its tests take the group-size cases from the catalogue here,
plus dtype-keyed tolerances and small random inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import shape_cases

from pallas_kernels import differentiable, gating, reference

M, G, K, N = 64, 4, 16, 24  # rows, groups, contracted and output widths
TM = 16  # rows per tile in the tests: 4 row tiles, so shared and skipped tiles both occur
GS_CASES = shape_cases.group_size_cases(M, G)
BACKENDS = ("tpu", "gpu")
BACKEND_IDS = ("mosaic", "triton")  # not "tpu" / "gpu": conftest skips tests with those keywords
DTYPES = (jnp.float32, jnp.bfloat16)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference magnitude
# The differentiable kernels and their jnp references, by name.
FUNCTIONS = dict(
    gmm=(differentiable.gmm, reference.gmm), swiglu=(differentiable.swiglu, reference.swiglu)
)


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


# (D, E, k, n_groups, top_groups): a power-of-two router; Qwen1.5-MoE's 60 experts with k = 6
# over a wide D (the Triton kernel pads E and k and sums the router matmul over several D
# chunks); DeepSeek-V3's 256 experts in 8 groups, 4 of them eligible.
GATING_SHAPES = [(256, 64, 8, None, None), (2048, 60, 6, None, None), (1024, 256, 8, 8, 4)]


def check_gating(backend, d, e, k, n_groups, top_groups, *, interpret):
    """The gating kernel's routing, logits and gradients on 1000 bfloat16 tokens against
    `reference.top_k_gating` (sigmoid scores, renormalised weights)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1000, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, e)) / np.sqrt(d), jnp.float32)
    ct_w, ct_p = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1000, k), (1000, e)))
    opts = dict(k=k, score="sigmoid", normalize=True, n_groups=n_groups, top_groups=top_groups)

    def run(fn, x, w):
        _, pull = jax.vjp(lambda x, w: fn(x, w, **opts)[1::2], x, w)  # weights, probs
        return fn(x, w, **opts), pull((ct_w, ct_p))

    kernel = functools.partial(gating.top_k_gating, backend=backend, interpret=interpret)
    (ids, _, counts, probs, logits), grads = jax.jit(functools.partial(run, kernel))(x, w)
    with jax.default_matmul_precision("highest"):  # the kernel's router matmul is exact float32
        (_, _, _, _, ref_logits), ref_grads = run(reference.top_k_gating, x, w)
    # Selected on the kernel's own scores (a recomputed score may differ in the last bit).
    np.testing.assert_array_equal(ids, reference.top_k_ids(probs, k, n_groups, top_groups))
    np.testing.assert_array_equal(counts, np.bincount(np.ravel(ids), minlength=e))
    close(logits, ref_logits, jnp.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        close(g, rg, jnp.bfloat16)
