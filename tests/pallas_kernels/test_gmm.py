"""Forward kernels of `pallas_kernels.grouped_matmul`, interpreted, against the jnp reference.

The catalogue of group sizes, both dtypes and the gradients run through these kernels in
`test_differentiable.py` (one compile covers gmm, its transposed form and tgmm); this file covers
what the differentiable wrappers do not reach: several k / n blocks with a row count that needs
padding, NaN in rows and weights that must never be read, and the argument errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import BACKEND_IDS, BACKENDS, G, K, N, close, inputs

from pallas_kernels import reference
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.grouped_matmul import gmm, tgmm

ROWS = 37  # not a multiple of the tile: the kernels pad and slice
BS = BlockSizes(8, 8, 8)  # 5 row tiles, 2 k blocks, 3 n blocks


@functools.cache
def _kernels(backend):
    """gmm, gmm with `rhs[g].T` and tgmm in one interpreted, jitted function."""
    kw = dict(block_sizes=BS, backend=backend, interpret=True)

    @jax.jit
    def run(x, w, w_t, dy, gs):
        return (
            gmm(x, w, gs, **kw),
            gmm(x, w_t, gs, transpose_rhs=True, **kw),
            tgmm(x, dy, gs, **kw),
        )

    return run


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_many_blocks_padding_and_transposed_rhs(backend):
    x, w, w_t, dy = inputs(1, (ROWS, K), (G, K, N), (G, N, K), (ROWS, N))
    for gs in (np.array([5, 0, 20, 9], np.int32), np.array([0, 37, 0, 0], np.int32)):
        y, y_t, dw = _kernels(backend)(x, w, w_t, dy, gs)
        close(y, reference.gmm(x, w, gs), jnp.float32, err_msg=f"gmm {gs}")
        close(y_t, reference.gmm(x, w_t, gs, transpose_rhs=True), jnp.float32, err_msg="rhs.T")
        close(dw, reference.tgmm(x, dy, gs), jnp.float32, err_msg=f"tgmm {gs}")
        np.testing.assert_array_equal(np.asarray(y)[gs.sum() :], 0.0)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_unused_rows_and_empty_groups_are_never_read(backend):
    """NaN in rows past `sum(group_sizes)` and in empty groups' weights cannot leak."""
    gs = np.array([9, 0, 14, 0], np.int32)
    x, w, w_t, dy = (np.array(a) for a in inputs(5, (ROWS, K), (G, K, N), (G, N, K), (ROWS, N)))
    x[23:], dy[23:], w[[1, 3]], w_t[[1, 3]] = np.nan, np.nan, np.nan, np.nan
    outs = _kernels(backend)(x, w, w_t, dy, gs)
    for out in outs:
        assert np.isfinite(np.asarray(out)).all()
    clean = np.nan_to_num
    close(outs[0], reference.gmm(clean(x), clean(w), gs), jnp.float32)
    close(outs[2], reference.tgmm(clean(x), clean(dy), gs), jnp.float32)


def test_argument_errors():
    x, w, gs = jnp.ones((8, K)), jnp.ones((G, K, N)), np.ones(G, np.int32)
    with pytest.raises(ValueError, match="rhs"):
        gmm(x, jnp.ones((G, K + 1, N)), gs, interpret=True)
    with pytest.raises(ValueError, match="num_local=4"):
        gmm(x, w, np.ones(3, np.int32), interpret=True)
    with pytest.raises(ValueError, match="group_offset=2"):
        gmm(x, w[:3], gs, group_offset=2, interpret=True)
    with pytest.raises(ValueError, match="backend='cuda'"):
        gmm(x, w, gs, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="k=16 is not a multiple of tk=5"):
        gmm(x, w, gs, block_sizes=BlockSizes(8, 5, 8), interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be"):
        tgmm(x, x, gs[None], interpret=True)
    with pytest.raises(ValueError, match="8 rows but rhs has 4"):
        tgmm(x, x[:4], gs, interpret=True)


def test_zero_rows_give_empty_or_zero_outputs():
    gs = np.zeros(G, np.int32)
    assert gmm(jnp.ones((0, K)), jnp.ones((G, K, N)), gs, interpret=True).shape == (0, N)
    dw = tgmm(jnp.ones((0, K)), jnp.ones((0, N)), gs, interpret=True)
    assert dw.shape == (G, K, N) and not np.asarray(dw).any()


@pytest.mark.parametrize("group_sizes", [[0, 0], [3, 20]], ids=["no_rows", "partial"])
def test_mosaic_pipeline_writes_nothing_uninitialised(group_sizes):
    """The TPU interpreter with NaN-filled fresh buffers models Mosaic's block pipeline: idle
    visits (every visit when no group has rows) must not write back uninitialised blocks."""
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    nan_buffers = pltpu.InterpretParams(uninitialized_memory="nan")
    x = jnp.ones((64, 128))
    gs = jnp.array(group_sizes, jnp.int32)
    y = gmm(x, jnp.ones((2, 128, 128)), gs, backend="tpu", interpret=nan_buffers)
    rows = sum(group_sizes)
    np.testing.assert_array_equal(y[rows:], 0.0)
    np.testing.assert_array_equal(y[:rows], 128.0)
    dw = tgmm(x, x, gs, backend="tpu", interpret=nan_buffers)
    want = np.broadcast_to(np.asarray(group_sizes, np.float32)[:, None, None], dw.shape)
    np.testing.assert_array_equal(dw, want)
