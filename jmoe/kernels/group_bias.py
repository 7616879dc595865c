"""Per-group biases and column scales on rows sorted by group: row r gets its group's."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
    """`[M]` int32 group of each of `num_rows` sorted rows; `G` for the rows past the groups."""
    ends_G = jnp.cumsum(jnp.asarray(group_sizes_G, jnp.int32))
    # Row r belongs to the first group whose rows end after r; past the last end, G.
    return jnp.searchsorted(ends_G, jnp.arange(num_rows), side="right").astype(jnp.int32)


def _rows_of_groups(values_GxN, group_sizes_G, num_rows: int, fill: float) -> jax.Array:
    """`[M, N]` float32: each sorted row's group's values; `fill` past `sum(group_sizes)`."""
    _, n = values_GxN.shape
    padded_Gp1xN = jnp.concatenate(
        [values_GxN.astype(jnp.float32), jnp.full((1, n), fill, jnp.float32)]
    )
    return jnp.take(padded_Gp1xN, row_groups(group_sizes_G, num_rows), axis=0)


def add_group_bias(
    y_MxN: jax.Array, bias_GxN: jax.Array | None, group_sizes_G: jax.Array
) -> jax.Array:
    """`y[r] + bias[group(r)]` for rows sorted by group; rows past `sum(group_sizes)` stay as
    they are (zeros from every grouped matmul), so no bias leaks into unused rows. Adds in
    float32 and returns `y_MxN.dtype`; `bias_GxN=None` returns `y_MxN`."""
    if bias_GxN is None:
        return y_MxN
    rows_MxN = _rows_of_groups(bias_GxN, group_sizes_G, y_MxN.shape[0], 0.0)
    return (y_MxN.astype(jnp.float32) + rows_MxN).astype(y_MxN.dtype)


def scale_group_columns(
    y_MxN: jax.Array, scale_GxN: jax.Array | None, group_sizes_G: jax.Array
) -> jax.Array:
    """`y[r] * scale[group(r)]` (a quantized weight's column scales, `jmoe.kernels.quantization`)
    for rows sorted by group; rows past `sum(group_sizes)` stay as they are. Multiplies in
    float32 and returns `y_MxN.dtype`; `scale_GxN=None` returns `y_MxN`."""
    if scale_GxN is None:
        return y_MxN
    rows_MxN = _rows_of_groups(scale_GxN, group_sizes_G, y_MxN.shape[0], 1.0)
    return (y_MxN.astype(jnp.float32) * rows_MxN).astype(y_MxN.dtype)
