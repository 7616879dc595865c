"""Differentiable `gmm` and fused `swiglu` (custom_vjp over interpreted kernels) against
`jax.vjp` of the jnp reference, over the shared catalogue of group sizes, in float32 and bfloat16.

One jitted `vjp` per (function, backend, dtype) runs the forward kernel, the transposed gmm and
tgmm (and the fused SwiGLU backward kernel), so each compiles once and every case reuses it.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
    BACKEND_IDS,
    BACKENDS,
    DTYPES,
    FUNCTIONS,
    GS_CASES,
    TM,
    G,
    K,
    M,
    N,
    close,
    inputs,
)

from pallas_kernels import grouped_matmul as forward_kernels
from pallas_kernels.block_sizes import BlockSizes

BS = BlockSizes(TM, K, N)


def _vjp(f, weights, x, gs, ct, offset):
    y, vjp = jax.vjp(lambda x, *ws: f(x, *ws, gs, group_offset=offset), x, *weights)
    return y, vjp(ct)


@functools.cache
def _kernel_vjp(name, backend):
    f = functools.partial(FUNCTIONS[name][0], block_sizes=BS, backend=backend, interpret=True)
    return jax.jit(functools.partial(_vjp, f))


def _check(name, backend, dtype, gs, *, num_local=G, offset=0, seed=0, err_msg=""):
    n_w = 1 if name == "gmm" else 2
    x, *ws, ct = inputs(seed, (M, K), *[(num_local, K, N)] * n_w, (M, N), dtype=dtype)
    ws = [w * K**-0.5 for w in ws] if name == "swiglu" else ws  # keeps silu in its bend
    y, grads = _kernel_vjp(name, backend)(ws, x, gs, ct, jnp.int32(offset))
    ry, rgrads = _vjp(FUNCTIONS[name][1], ws, x, gs, ct, offset)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    close(y, ry, dtype, err_msg=f"forward {err_msg}")
    for i, (g, rg) in enumerate(zip(grads, rgrads, strict=True)):
        assert g.shape == rg.shape
        close(g, rg, dtype, err_msg=f"grad {i} {err_msg}")
    used = int(np.sum(gs))
    np.testing.assert_array_equal(np.asarray(y, np.float32)[used:], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0], np.float32)[used:], 0.0)
    local_sizes = np.asarray(gs)[offset : offset + num_local]
    for g in grads[1:]:  # empty groups' weights get exactly zero gradient
        np.testing.assert_array_equal(np.asarray(g, np.float32)[local_sizes == 0], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_forward_and_gradients_over_catalogue(name, backend, dtype):
    for case, gs in GS_CASES.items():
        _check(name, backend, dtype, gs, err_msg=case)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_local_groups_with_traced_offset(backend):
    """Expert parallelism: 2 local experts of 4; rows of other groups give zeros, no gradient."""
    gs = np.array([10, 0, 21, 17], np.int32)
    for offset in (0, 1, 2):
        _check("gmm", backend, jnp.float32, gs, num_local=2, offset=offset, err_msg=f"{offset=}")


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_wrappers_keep_the_forward_signature_and_docstring(name):
    """`jax.custom_vjp` wraps the forward kernel itself: one signature, one docstring, and keyword
    calls bind as they do on the forward kernel."""
    wrapped, forward = FUNCTIONS[name][0], getattr(forward_kernels, name)
    assert inspect.signature(wrapped) == inspect.signature(forward)
    assert wrapped.__doc__ == forward.__doc__
    x, w = inputs(0, (M, K), (G, K, N))
    ws = (w,) if name == "gmm" else (w, w)
    gs = GS_CASES["ragged_tail"]
    kw = dict(block_sizes=BS, backend="tpu", interpret=True)
    np.testing.assert_array_equal(wrapped(x, *ws, gs, **kw), forward(x, *ws, gs, **kw))
