"""The XLA grouped matmul: a loop over the valid row tiles only.

Rows sorted by group are copied into a tile-aligned layout where every group starts on a tile
boundary, so each tile belongs to one group and multiplies one expert's weights. A loop runs over
the valid tiles only: its cost follows the routed rows, not the number of groups, and rows past
`sum(group_sizes)` (unused / null slots) are never touched. The backward passes are loops of the
same shape, accumulating weight gradients tile by tile (`jax.custom_vjp`).

`expert_mlp` runs a whole expert MLP (gate and up projections, activation, down projection) per
tile, keeping the `[tile, F]` intermediates out of the `[M, F]` round trips of three separate
grouped matmuls; its backward reuses the saved pre-activations.

Quantized weights (`jmoe.kernels.quantization`, int8 or fp8 with column scales) are converted to
the rows' dtype one group's matrix at a time inside the loop, and each product's columns are
multiplied by that group's scales; they have no backward pass (inference only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.kernels.activations import Activation, activation_fn
from jmoe.kernels.permute import permute_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where each sorted row lives in the tile-aligned layout.

    Attributes:
      tile_group: `[N]` int32 group of each tile; only the first `num_tiles` are valid.
      num_tiles: int32 scalar, number of valid tiles `sum(ceil(group_sizes / tile))`.
      padded_src: `[P]` int32 sorted row that fills each padded row (`M` = a zero row).
      row_to_padded: `[M]` int32 padded row of each sorted row (`P` = the row is unused).
      tile: rows per tile (static).
    """

    tile_group: jax.Array
    num_tiles: jax.Array
    padded_src: jax.Array
    row_to_padded: jax.Array
    tile: int = dataclasses.field(metadata=dict(static=True))

    def pad(self, x_MxD: jax.Array) -> jax.Array:
        return permute_rows(x_MxD, self.padded_src, self.row_to_padded)

    def unpad(self, y_PxD: jax.Array) -> jax.Array:
        return permute_rows(y_PxD, self.row_to_padded, self.padded_src)


def default_tile(num_rows: int, num_groups: int) -> int:
    """Rows per tile: about half the mean group, a power of two in [32, 512]."""
    target = max(num_rows // (2 * num_groups), 1)
    return int(min(max(1 << (target.bit_length() - 1), 32), 512))


def make_tile_plan(group_sizes_G: jax.Array, num_rows: int, tile: int) -> TilePlan:
    """Plans the tile-aligned layout of `num_rows` rows sorted into groups of `group_sizes_G`."""
    num_groups = group_sizes_G.shape[0]
    sizes_G = jnp.asarray(group_sizes_G, jnp.int32)
    # 1. Group g takes `ceil(size / tile)` whole tiles, so no tile mixes two groups: its tiles are
    #    `[tile_start, tile_end)` and its sorted rows `[row_start, row_end)`; an empty group has
    #    none of either.
    tiles_G = (sizes_G + tile - 1) // tile
    tile_end_G = jnp.cumsum(tiles_G)
    tile_start_G = tile_end_G - tiles_G
    row_end_G = jnp.cumsum(sizes_G)
    row_start_G = row_end_G - sizes_G
    # 2. The buffers need a static size: each group pads less than one tile, so
    #    `sum(ceil(size / tile)) <= ceil(num_rows / tile) + num_groups` tiles always suffice.
    max_tiles = -(-num_rows // tile) + num_groups
    padded_rows = max_tiles * tile

    # 3. Tile i belongs to the first group whose tiles end after i (`side="right"` skips the empty
    #    groups, whose tiles end where the previous group's do). Tiles past the valid ones are
    #    never run; they are clipped to a real group only to keep the index in bounds.
    tile_group_N = jnp.searchsorted(tile_end_G, jnp.arange(max_tiles), side="right")
    tile_group_N = jnp.minimum(tile_group_N, num_groups - 1)

    # 4. Padded row p lies `within` rows into its group's first tile: it holds the group's row
    #    `row_start + within` while its tile is valid and `within < size`, else the zero row
    #    (`num_rows`, out of range for `permute_rows`).
    p_P = jnp.arange(padded_rows)
    g_P = tile_group_N[p_P // tile]
    within_P = p_P - tile_start_G[g_P] * tile
    real_P = (p_P // tile < tile_end_G[-1]) & (within_P < sizes_G[g_P])
    padded_src_P = jnp.where(real_P, row_start_G[g_P] + within_P, num_rows)

    # 5. The inverse map: sorted row r of group g (found as in step 3, on the row ends) goes to
    #    padded row `tile_start[g] * tile + (r - row_start[g])`; rows past `sum(group_sizes)` (the
    #    unused slots) go nowhere (`padded_rows`, out of range).
    r_M = jnp.arange(num_rows)
    g_M = jnp.minimum(jnp.searchsorted(row_end_G, r_M, side="right"), num_groups - 1)
    used_M = r_M < row_end_G[-1]
    row_to_padded_M = jnp.where(
        used_M, tile_start_G[g_M] * tile + r_M - row_start_G[g_M], padded_rows
    )
    return TilePlan(
        tile_group=tile_group_N.astype(jnp.int32),
        num_tiles=tile_end_G[-1].astype(jnp.int32),
        padded_src=padded_src_P.astype(jnp.int32),
        row_to_padded=row_to_padded_M.astype(jnp.int32),
        tile=tile,
    )


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """`a.T @ b` in float32 (weight-gradient shape)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_bt(a, b):
    """`a @ b.T` in float32 (activation-gradient shape)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _over_tiles(plan: TilePlan, body, carry):
    """Runs `carry = body(g, row0, carry)` over the valid tiles (group `g`, first row `row0`)."""
    step = lambda i, c: body(plan.tile_group[i], i * plan.tile, c)  # noqa: E731
    return jax.lax.fori_loop(0, plan.num_tiles, step, carry)


def _rows(x, row0, tile):
    return jax.lax.dynamic_slice_in_dim(x, row0, tile)


def _put(x, rows, row0):
    return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), row0, 0)


def _f32_zeros(shape):
    return jnp.zeros(shape, jnp.float32)


def _project(x_t, w_GxKxN, scale_GxN, bias_GxN, g):
    """`x_t @ w[g] (+ bias[g])` in float32. A quantized `w` (with scales) has only group `g`'s
    `[K, N]` matrix converted to the rows' dtype, so no full-precision `[G, K, N]` copy exists,
    and the product's columns are scaled: `x @ (q * s) == (x @ q) * s`."""
    if scale_GxN is None:
        y_f32 = _dot(x_t, w_GxKxN[g])
    else:
        y_f32 = _dot(x_t, w_GxKxN[g].astype(x_t.dtype)) * scale_GxN[g].astype(jnp.float32)
    return _biased(y_f32, bias_GxN, g)


def _check_differentiable(*scales):
    if any(s is not None for s in scales):
        raise NotImplementedError(
            "the grouped matmul has no backward pass for quantized expert weights: they are for "
            "inference (MoEConfig.expert_quantization); train with float weights"
        )


# ---------------------------------------------------------------- grouped matmul on padded rows


@jax.custom_vjp
def _gmm_padded(x_PxK, w_GxKxN, scale_GxN, plan: TilePlan) -> jax.Array:
    def tile(g, row0, y):
        return _put(y, _project(_rows(x_PxK, row0, plan.tile), w_GxKxN, scale_GxN, None, g), row0)

    y0 = jnp.zeros((x_PxK.shape[0], w_GxKxN.shape[2]), x_PxK.dtype)
    return _over_tiles(plan, tile, y0)


def _gmm_padded_fwd(x_PxK, w_GxKxN, scale_GxN, plan):
    return _gmm_padded(x_PxK, w_GxKxN, scale_GxN, plan), (x_PxK, w_GxKxN, scale_GxN, plan)


def _gmm_padded_bwd(res, dy_PxN):
    x_PxK, w_GxKxN, scale_GxN, plan = res
    _check_differentiable(scale_GxN)

    def tile(g, row0, carry):
        dx, dw = carry
        dy_t = _rows(dy_PxN, row0, plan.tile)
        dx = _put(dx, _dot_bt(dy_t, w_GxKxN[g]), row0)
        return dx, dw.at[g].add(_dot_t(_rows(x_PxK, row0, plan.tile), dy_t))

    dx, dw = _over_tiles(plan, tile, (jnp.zeros_like(x_PxK), _f32_zeros(w_GxKxN.shape)))
    return dx, dw.astype(w_GxKxN.dtype), None, None


_gmm_padded.defvjp(_gmm_padded_fwd, _gmm_padded_bwd)


def grouped_matmul(
    x_MxK: jax.Array,
    w_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    scale_GxN: jax.Array | None = None,
    *,
    tile: int | None = None,
) -> jax.Array:
    """`y[r] = x[r] @ w[group(r)]` for rows sorted by group; rows past the groups are zero.

    With `scale_GxN` (quantized `w`, `jmoe.kernels.quantization`) each tile converts its group's
    `w` to the rows' dtype and multiplies the product's columns by the group's scales
    (forward only)."""
    x_MxK, w_GxKxN = jnp.asarray(x_MxK), jnp.asarray(w_GxKxN)
    m, g = x_MxK.shape[0], w_GxKxN.shape[0]
    plan = make_tile_plan(group_sizes_G, m, tile or default_tile(m, g))
    return plan.unpad(_gmm_padded(plan.pad(x_MxK), w_GxKxN, scale_GxN, plan))


# ---------------------------------------------------------------- fused expert MLP on padded rows


def _mlp_padded_loop(x_PxD, w_in, w_down, b_in, b_down, s_in, s_down, plan, activation, save_pre):
    """Forward over the valid tiles; also returns the pre-activations if `save_pre`.

    Padded rows of a tile (zero rows of `x`) pick up the biases too, but `unpad` drops them and
    their output cotangents are zero, so they add nothing to any gradient."""
    act = activation_fn(activation)
    none = (None,) * len(w_in)

    def tile(g, row0, carry):
        y, pres = carry
        x_t = _rows(x_PxD, row0, plan.tile)
        pre = tuple(
            _project(x_t, w, s, b, g).astype(x_t.dtype)
            for w, s, b in zip(w_in, s_in or none, b_in or none, strict=True)
        )
        y = _put(y, _project(act(*pre), w_down, s_down, b_down, g), row0)
        if save_pre:
            pres = tuple(_put(p, p_t, row0) for p, p_t in zip(pres, pre, strict=True))
        return y, pres

    p = x_PxD.shape[0]
    y0 = jnp.zeros((p, w_down.shape[2]), x_PxD.dtype)
    pres0 = tuple(jnp.zeros((p, w.shape[2]), x_PxD.dtype) for w in w_in) if save_pre else ()
    return _over_tiles(plan, tile, (y0, pres0))


def _biased(y_f32, bias_GxN, g):
    return y_f32 if bias_GxN is None else y_f32 + bias_GxN[g].astype(jnp.float32)


def _mlp_padded_impl(x_PxD, w_in, w_down, b_in, b_down, s_in, s_down, plan, activation):
    weights = (w_in, w_down, b_in, b_down, s_in, s_down)
    return _mlp_padded_loop(x_PxD, *weights, plan, activation, False)[0]


def _mlp_padded_fwd(x_PxD, w_in, w_down, b_in, b_down, s_in, s_down, plan, activation):
    weights = (w_in, w_down, b_in, b_down, s_in, s_down)
    y, pres = _mlp_padded_loop(x_PxD, *weights, plan, activation, True)
    return y, (x_PxD, *weights, plan, pres)


def _mlp_padded_bwd(activation, res, dy_PxD):
    x_PxD, w_in, w_down, b_in, b_down, s_in, s_down, plan, pres = res
    _check_differentiable(s_down, *s_in)
    act = activation_fn(activation)

    def tile(g, row0, carry):
        dx, dw_in, dw_down, db_in, db_down = carry
        x_t = _rows(x_PxD, row0, plan.tile)
        dy_t = _rows(dy_PxD, row0, plan.tile)
        h, h_vjp = jax.vjp(act, *(_rows(p, row0, plan.tile) for p in pres))
        dpre = h_vjp(_dot_bt(dy_t, w_down[g]).astype(h.dtype))
        dx_t = sum(_dot_bt(d, w[g]) for d, w in zip(dpre, w_in, strict=True))
        dw_in = tuple(a.at[g].add(_dot_t(x_t, d)) for a, d in zip(dw_in, dpre, strict=True))
        # a bias's gradient is the sum of its rows' pre-activation (or output) cotangents
        # (`db_in` is () when unbiased)
        db_in = tuple(
            a.at[g].add(d.astype(jnp.float32).sum(0)) for a, d in zip(db_in, dpre, strict=False)
        )
        if db_down is not None:
            db_down = db_down.at[g].add(dy_t.astype(jnp.float32).sum(0))
        dw_down = dw_down.at[g].add(_dot_t(h, dy_t))
        return _put(dx, dx_t, row0), dw_in, dw_down, db_in, db_down

    init = (
        jnp.zeros_like(x_PxD),
        tuple(_f32_zeros(w.shape) for w in w_in),
        _f32_zeros(w_down.shape),
        tuple(_f32_zeros(b.shape) for b in b_in),
        None if b_down is None else _f32_zeros(b_down.shape),
    )
    dx, dw_in, dw_down, db_in, db_down = _over_tiles(plan, tile, init)
    cast = lambda ds, xs: tuple(d.astype(x.dtype) for d, x in zip(ds, xs, strict=True))  # noqa: E731
    db_down = None if b_down is None else db_down.astype(b_down.dtype)
    dw_in, dw_down = cast(dw_in, w_in), dw_down.astype(w_down.dtype)
    return dx, dw_in, dw_down, cast(db_in, b_in), db_down, (), None, None


_mlp_padded = jax.custom_vjp(_mlp_padded_impl, nondiff_argnums=(8,))
_mlp_padded.defvjp(_mlp_padded_fwd, _mlp_padded_bwd)


def expert_mlp(
    x_MxD: jax.Array,
    w_in: tuple[jax.Array, ...],
    w_down_GxFxD: jax.Array,
    group_sizes_G: jax.Array,
    activation: Activation,
    b_in: tuple[jax.Array, ...] = (),
    b_down_GxD: jax.Array | None = None,
    scales_in: tuple[jax.Array, ...] = (),
    scale_down_GxD: jax.Array | None = None,
    *,
    tile: int | None = None,
) -> jax.Array:
    """Per-row expert MLP `act(x @ w_in[g] + b_in[g] ...) @ w_down[g] + b_down[g]` for rows
    sorted by group `g`.

    Args:
      x_MxD: rows sorted by group; rows past `sum(group_sizes)` come out as zeros, at no cost.
      w_in: `(w_gate, w_up)` for "swiglu" or `(w_up,)` otherwise, each `[G, D, F]`.
      w_down_GxFxD: down projections.
      group_sizes_G: int32 rows per group.
      activation: a key of `ACTIVATIONS` or a `ClampedSwiGLU`.
      b_in: `()` or one `[G, F]` bias per `w_in` entry; `b_down_GxD`: None or `[G, D]`.
      scales_in, scale_down_GxD: `()` / None, or the column scales (`[G, F]` per `w_in` entry,
        `[G, D]`) of quantized weights (`jmoe.kernels.quantization`): each tile converts only
        its group's weights to the rows' dtype and scales the products' columns (forward only).
      tile: rows per tile (default `default_tile`).
    """
    x_MxD, w_down_GxFxD = jnp.asarray(x_MxD), jnp.asarray(w_down_GxFxD)
    w_in = tuple(map(jnp.asarray, w_in))
    m, g = x_MxD.shape[0], w_down_GxFxD.shape[0]
    plan = make_tile_plan(group_sizes_G, m, tile or default_tile(m, g))
    weights = (w_in, w_down_GxFxD, b_in, b_down_GxD, tuple(scales_in), scale_down_GxD)
    y_PxD = _mlp_padded(plan.pad(x_MxD), *weights, plan, activation)
    return plan.unpad(y_PxD)
