"""Group metadata shared by the kernels: which row tiles each group touches, and where it lives.

Rows are sorted by group: group `g` owns rows `[offsets[g], offsets[g + 1])`. Only the local
groups `[group_offset, group_offset + num_local)` are computed (expert parallelism computes its own
experts); every other row, including the rows past `sum(group_sizes)` where unused / null slots
go, is never read and comes out as zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sizes import BACKENDS, TRITON_AVAILABLE


def default_backend(backend: str | None) -> str:
    """The kernel family for `backend=None`: the accelerator's own, "tpu" on CPU (interpret)."""
    if backend is None:
        return "gpu" if jax.default_backend() == "gpu" else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {(None, *BACKENDS)}")
    return backend


def tpu_params(interpret: bool, semantics: tuple[str, ...]):
    """Mosaic compiler options with the grid axes' `semantics`; None when interpreted."""
    return None if interpret else pltpu.CompilerParams(dimension_semantics=semantics)


def triton_params(interpret: bool, **options):
    """Triton compiler options for a GPU kernel; None when interpreted.

    Triton is named explicitly because JAX may default GPU kernels to Mosaic GPU. It is imported
    on use: JAX deprecates its Pallas Triton backend, and a JAX without it must still import these
    kernels (and run them interpreted).
    """
    if interpret:
        return None
    if not TRITON_AVAILABLE:
        raise NotImplementedError(
            f"JAX {jax.__version__} has no Pallas Triton backend, which the GPU kernels use; "
            'use implementation="xla" or "ragged_dot" (implementation=None does so)'
        )
    from jax.experimental.pallas import triton

    return triton.CompilerParams(**options)


# How group-limited selection scores a group: the number of its best selection scores summed,
# "top2_sum" (DeepSeek-V3: the two best, whatever k) or "max" (DeepSeek-V2: the best one).
GROUP_SCORES = {"top2_sum": 2, "max": 1}


def check_groups(
    e: int,
    k: int,
    n_groups: int | None,
    top_groups: int | None,
    group_score: str = "top2_sum",
) -> None:
    """Raises a ValueError naming the values unless `n_groups` / `top_groups` (both None: no
    group limit) is a valid group-limited selection of `k` of `e` experts, each group scored by
    `group_score` (a key of `GROUP_SCORES`)."""
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={group_score!r} is not one of {tuple(GROUP_SCORES)}")
    if n_groups is None and top_groups is None:
        return
    if n_groups is None or top_groups is None:
        raise ValueError(
            f"group-limited selection needs both n_groups and top_groups (or neither), got "
            f"{n_groups=}, {top_groups=}"
        )
    if n_groups < 1 or e % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide num_experts={e}")
    if not 1 <= top_groups <= n_groups:
        raise ValueError(f"top_groups={top_groups} must be in [1, n_groups={n_groups}]")
    if k > top_groups * (e // n_groups):
        raise ValueError(
            f"k={k} exceeds the {top_groups * (e // n_groups)} experts of top_groups={top_groups}"
            f" groups of {e // n_groups}; raise top_groups or lower k"
        )
    if e // n_groups < GROUP_SCORES[group_score]:
        raise ValueError(
            f"group_score={group_score!r} sums the {GROUP_SCORES[group_score]} best scores of a "
            f"group, but n_groups={n_groups} leaves {e // n_groups} expert(s) per group; use "
            'fewer groups or group_score="max"'
        )


def local_offsets(
    group_sizes: jax.Array, group_offset: jax.Array | int, num_local: int
) -> jax.Array:
    """`[num_local + 1]` int32 first row of each local group, then the end of the last one."""
    sizes_G = jnp.asarray(group_sizes, jnp.int32)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes_G)])
    return jax.lax.dynamic_slice_in_dim(
        offsets, jnp.asarray(group_offset, jnp.int32), num_local + 1
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visits:
    """The (row tile, local group) pairs a grouped kernel visits, in row order.

    A row tile shared by two groups is visited once per group, so there are at most
    `num_row_tiles + num_local - 1` visits; only the first `num_active` are real, the rest repeat
    the last real one (its blocks are already resident, so they cost no copy) and do no work.

    Attributes:
      group: `[V]` int32 local group of each visit.
      m_tile: `[V]` int32 row tile of each visit.
      row_start, row_end: `[V]` int32 rows of the group (a visit masks the rest of its tile).
      num_active: `[1]` int32 number of real visits.
    """

    group: jax.Array
    m_tile: jax.Array
    row_start: jax.Array
    row_end: jax.Array
    num_active: jax.Array

    @property
    def size(self) -> int:
        return self.group.shape[0]


def make_visits(offsets_L1: jax.Array, num_rows: int, tm: int) -> Visits:
    """Plans the visits of `num_rows` rows (a multiple of `tm`) over the groups of `offsets_L1`."""
    num_local = offsets_L1.shape[0] - 1
    start_L, end_L = offsets_L1[:-1], offsets_L1[1:]
    nonempty_L = end_L > start_L
    first_L = start_L // tm
    visits_L = jnp.where(nonempty_L, (end_L - 1) // tm - first_L + 1, 0)
    cum_L = jnp.cumsum(visits_L)
    num_active = cum_L[-1]
    size = max(num_rows // tm + num_local - 1, 1)
    i_V = jnp.minimum(jnp.arange(size, dtype=jnp.int32), jnp.maximum(num_active - 1, 0))
    group_V = jnp.minimum(jnp.searchsorted(cum_L, i_V, side="right"), num_local - 1)
    m_tile_V = first_L[group_V] + i_V - (cum_L[group_V] - visits_L[group_V])
    return Visits(
        group=group_V.astype(jnp.int32),
        m_tile=jnp.clip(m_tile_V, 0, num_rows // tm - 1).astype(jnp.int32),
        row_start=start_L[group_V],
        row_end=end_L[group_V],
        num_active=num_active.reshape(1).astype(jnp.int32),
    )


def tile_group_range(offsets_L1: jax.Array, num_rows: int, tm: int) -> tuple[jax.Array, jax.Array]:
    """`[num_rows // tm]` int32 first and one-past-last local group overlapping each row tile."""
    start_L, end_L = offsets_L1[:-1], offsets_L1[1:]
    row0_T = jnp.arange(num_rows // tm, dtype=jnp.int32) * tm
    # Group g overlaps [row0, row0 + tm) iff it is non-empty, end_g > row0 and start_g < row0 + tm;
    # groups are sorted, so the overlapping ones form a contiguous range.
    first_T = jnp.searchsorted(end_L, row0_T, side="right")
    last_T = jnp.searchsorted(start_L, row0_T + tm, side="left")
    return first_T.astype(jnp.int32), last_T.astype(jnp.int32)


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """`x` with zero rows appended up to a multiple of `multiple` (no copy when aligned)."""
    extra = -x.shape[0] % multiple
    return x if extra == 0 else jnp.pad(x, ((0, extra), (0, 0)))


def row_mask(
    row0: jax.Array, tm: int, start: jax.Array, end: jax.Array, cols: int = 1
) -> jax.Array:
    """`[tm, cols]` bool: which rows `row0 + i` of a tile lie in `[start, end)`."""
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, cols), 0)
    return (rows >= start) & (rows < end)


def dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False):
    """`a @ b` (either side transposed) accumulated in float32."""
    dims = (((0,) if transpose_a else (1,)), ((1,) if transpose_b else (0,)))
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)
