"""Group metadata: the visits (row tile, group) and per-tile group ranges against NumPy sets.

This is where "skip empty groups and every tile past `sum(group_sizes)`" is decided: the number
of real visits equals the number of (tile, non-empty local group) overlaps, and does not grow
with trailing unused rows or with empty groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import GS_CASES, M

from pallas_kernels import block_sizes, common


def _overlaps(gs, offset, num_local, m, tm):
    """NumPy: the sorted (row tile, local group) pairs where the group has rows in the tile."""
    ends = np.cumsum(gs)
    starts = ends - gs
    pairs = []
    for t in range(m // tm):
        for g in range(num_local):
            s, e = starts[offset + g], ends[offset + g]
            if e > s and s < (t + 1) * tm and e > t * tm:
                pairs.append((t, g))
    return pairs


def _visits(gs, offset, num_local, m, tm):
    offsets = common.local_offsets(jnp.asarray(gs), offset, num_local)
    return jax.jit(common.make_visits, static_argnums=(1, 2))(offsets, m, tm), offsets


def _check(gs, offset, num_local, m, tm):
    v, offsets = _visits(gs, offset, num_local, m, tm)
    expected = _overlaps(gs, offset, num_local, m, tm)
    n = int(v.num_active[0])
    assert n == len(expected) <= v.size == max(m // tm + num_local - 1, 1)
    got = list(zip(np.asarray(v.m_tile)[:n].tolist(), np.asarray(v.group)[:n].tolist()))
    assert got == expected
    np.testing.assert_array_equal(np.asarray(v.row_start), np.asarray(offsets)[np.asarray(v.group)])
    if n:  # padding visits repeat the last real one (no new block copies)
        assert (np.asarray(v.m_tile)[n:] == got[-1][0]).all()
        assert (np.asarray(v.group)[n:] == got[-1][1]).all()
    first, last = (np.asarray(a) for a in common.tile_group_range(offsets, m, tm))
    for t in range(m // tm):
        in_range = [g for g in range(first[t], last[t]) if gs[offset + g] > 0]
        assert in_range == [g for tt, g in expected if tt == t]


@pytest.mark.parametrize("case", list(GS_CASES))
@pytest.mark.parametrize("tm", [8, 16, 64])
def test_visits_over_catalogue(case, tm):
    _check(np.asarray(GS_CASES[case]), 0, len(GS_CASES[case]), M, tm)


def test_visits_random_and_local_groups():
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = int(rng.integers(1, 9))
        tm = int(rng.choice([1, 4, 8]))
        m = tm * int(rng.integers(1, 12))
        gs = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g).astype(np.int32)
        num_local = int(rng.integers(1, g + 1))
        _check(gs, int(rng.integers(0, g - num_local + 1)), num_local, m, tm)


def test_cost_follows_used_rows_only():
    """Trailing unused rows and extra empty groups add no visit (tm = 8: group 0 touches tile
    0, group 2 rows 5..21 tiles 0-2, group 3 rows 22..24 tiles 2-3)."""
    gs = np.array([5, 0, 17, 3], np.int32)
    base = int(_visits(gs, 0, 4, 32, 8)[0].num_active[0])
    more_rows = int(_visits(gs, 0, 4, 4096, 8)[0].num_active[0])
    more_groups = np.concatenate([gs, np.zeros(60, np.int32)])
    assert (
        base == more_rows == int(_visits(more_groups, 0, 64, 32, 8)[0].num_active[0]) == 6
    )  # 1 + 3 + 2
    assert int(_visits(np.zeros(64, np.int32), 0, 64, 4096, 8)[0].num_active[0]) == 0


def test_gpu_kernels_without_pallas_triton(monkeypatch):
    """A JAX without the (deprecated) Pallas Triton backend: the GPU kernels are unsupported,
    say so by name when forced, and still run interpreted."""
    monkeypatch.setattr(block_sizes, "TRITON_AVAILABLE", False)
    monkeypatch.setattr(common, "TRITON_AVAILABLE", False)
    assert not block_sizes.available("gpu") and block_sizes.available("tpu")
    assert not block_sizes.supported(256, 256, jnp.bfloat16, "gpu")
    assert block_sizes.supported(256, 256, jnp.bfloat16, "tpu")
    with pytest.raises(NotImplementedError, match='no Pallas Triton backend.*"xla"'):
        common.triton_params(False, num_warps=4)
    assert common.triton_params(True, num_warps=4) is None
