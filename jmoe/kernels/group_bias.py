"""Per-group biases on rows sorted by group: row r gets the bias of its group."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
    """`[M]` int32 group of each of `num_rows` sorted rows; `G` for the rows past the groups."""
    ends_G = jnp.cumsum(jnp.asarray(group_sizes_G, jnp.int32))
    # Row r belongs to the first group whose rows end after r; past the last end, G.
    return jnp.searchsorted(ends_G, jnp.arange(num_rows), side="right").astype(jnp.int32)


def add_group_bias(
    y_MxN: jax.Array, bias_GxN: jax.Array | None, group_sizes_G: jax.Array
) -> jax.Array:
    """`y[r] + bias[group(r)]` for rows sorted by group; rows past `sum(group_sizes)` stay as
    they are (zeros from every grouped matmul), so no bias leaks into unused rows. Adds in
    float32 and returns `y_MxN.dtype`; `bias_GxN=None` returns `y_MxN`."""
    if bias_GxN is None:
        return y_MxN
    g, n = bias_GxN.shape
    padded_Gp1xN = jnp.concatenate([bias_GxN.astype(jnp.float32), jnp.zeros((1, n), jnp.float32)])
    rows_MxN = jnp.take(padded_Gp1xN, row_groups(group_sizes_G, y_MxN.shape[0]), axis=0)
    return (y_MxN.astype(jnp.float32) + rows_MxN).astype(y_MxN.dtype)
