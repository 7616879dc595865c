"""The same catalogue with the kernels compiled (Mosaic on TPU, Triton on GPU), at shapes that
meet the hardware's block rules; skipped on machines without the accelerator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases
from kernel_cases import DTYPES, FUNCTIONS, GATING_SHAPES, check_gating

M, G, K, N = 512, 8, 256, 384
CASES = shape_cases.group_size_cases(M, G)
# bfloat16: one rounding of the output; float32: the accelerator's default matmul precision
# (TF32 / bfloat16 passes) on both sides.
COMPILED_TOL = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}

accelerators = pytest.mark.parametrize(
    "backend",
    [pytest.param("tpu", marks=pytest.mark.tpu), pytest.param("gpu", marks=pytest.mark.gpu)],
)


def _close(a, b, dtype, err_msg=""):
    a, b = (np.asarray(jnp.asarray(v, jnp.float32), np.float64) for v in (a, b))
    tol = COMPILED_TOL[dtype]
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=err_msg)


@accelerators
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gmm", "swiglu"])
def test_compiled_forward_and_gradients(backend, dtype, name):
    f, ref = FUNCTIONS[name]
    n_w = 1 if name == "gmm" else 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(M, K)), dtype)
    ws = [jnp.asarray(rng.normal(size=(G, K, N)) / np.sqrt(K), dtype) for _ in range(n_w)]
    ct = jnp.asarray(rng.normal(size=(M, N)), dtype)

    def vjp(fn, gs):
        y, pull = jax.vjp(lambda x, *ws: fn(x, *ws, gs), x, *ws)
        return y, pull(ct)

    kernel = jax.jit(functools.partial(vjp, functools.partial(f, backend=backend)))
    for case, gs in CASES.items():
        y, grads = kernel(gs)
        ry, rgrads = vjp(ref, gs)
        _close(y, ry, dtype, err_msg=f"forward {case}")
        for i, (g, rg) in enumerate(zip(grads, rgrads, strict=True)):
            _close(g, rg, dtype, err_msg=f"grad {i} {case}")
        np.testing.assert_array_equal(np.asarray(y, np.float32)[gs.sum() :], 0.0)


@accelerators
@pytest.mark.parametrize("shape", GATING_SHAPES, ids=str)
def test_compiled_gating(backend, shape):
    check_gating(backend, *shape, interpret=False)
