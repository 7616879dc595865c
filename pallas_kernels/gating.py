"""Fused top-k gating: router matmul, softmax / sigmoid, selection bias and top-k in one kernel.

One program per tile of tokens computes `logits = x @ w` (float32, highest precision), the
scores, and picks the k best `scores + bias` by k rounds of "max, lowest index among the maxima,
mask it" (the tie rule of `jax.lax.top_k`). It writes expert ids, combine weights, scores, logits
and the tile's per-expert counts (summed outside, so tiles stay independent on every backend).

The backward (`jax.custom_vjp`) differentiates weights, scores and logits with the chosen ids
held fixed, then runs the two router-sized matmuls for `dx` and `dw` in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

SCORES = ("softmax", "sigmoid")
_HIGHEST = jax.lax.Precision.HIGHEST


def _scores(logits_TxE: jax.Array, score: str) -> jax.Array:
    """`jax.nn.softmax`'s formula (equal up to rounding; plain ops lower on every backend)."""
    if score == "sigmoid":
        return jax.nn.sigmoid(logits_TxE)
    unnormalized = jnp.exp(logits_TxE - jnp.max(logits_TxE, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def _combine(probs_TxE, ids_TxK, normalize, scale):
    weights = jnp.take_along_axis(probs_TxE, ids_TxK, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * scale


def check_block_tokens(tt: int, backend: str, interpret: bool) -> None:
    """Raises a ValueError naming `tt` if it cannot tile the tokens on `backend`."""
    if not isinstance(tt, int) or tt <= 0:
        raise ValueError(f"block_tokens={tt!r} must be a positive int")
    if interpret:
        return
    if backend == "tpu" and tt % 8:
        raise ValueError(f"block_tokens={tt} is not a multiple of 8 (TPU sublanes)")
    if backend == "gpu" and tt & (tt - 1):
        raise ValueError(f"block_tokens={tt} is not a power of two (GPU Triton blocks)")


def _gating_kernel(t, d, e, k, score, normalize, scale, tt):
    """Kernel and block specs for `T = t` tokens (a multiple of `tt`); `num_valid` rows count."""
    num_tiles = t // tt

    def kernel(num_valid_ref, x_ref, w_ref, bias_ref, ids_ref, wts_ref, probs_ref, logits_ref,
               counts_ref):  # fmt: skip
        logits = jax.lax.dot_general(
            x_ref[...].astype(jnp.float32), w_ref[...].astype(jnp.float32),
            (((1,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32,
        )  # fmt: skip
        probs = _scores(logits, score)
        sel = probs + bias_ref[...]
        col_E = jax.lax.broadcasted_iota(jnp.int32, (tt, e), 1)
        col_K = jax.lax.broadcasted_iota(jnp.int32, (tt, k), 1)
        ids = jnp.zeros((tt, k), jnp.int32)
        wts = jnp.zeros((tt, k), jnp.float32)
        onehot_sum = jnp.zeros((tt, e), jnp.float32)
        for j in range(k):
            best = jnp.max(sel, axis=-1, keepdims=True)
            idx = jnp.min(jnp.where(sel == best, col_E, e), axis=-1, keepdims=True)
            hit = col_E == idx
            ids = jnp.where(col_K == j, idx, ids)
            wts = jnp.where(col_K == j, jnp.sum(jnp.where(hit, probs, 0.0), -1, keepdims=True), wts)
            onehot_sum += hit.astype(jnp.float32)
            sel = jnp.where(hit, -jnp.inf, sel)
        if normalize:
            wts = wts / jnp.sum(wts, axis=-1, keepdims=True)
        rows = pl.program_id(0) * tt + jax.lax.broadcasted_iota(jnp.int32, (tt, 1), 0)
        onehot_sum = jnp.where(rows < num_valid_ref[0], onehot_sum, 0.0)
        ids_ref[...] = ids
        wts_ref[...] = wts * scale
        probs_ref[...] = probs
        logits_ref[...] = logits
        counts_ref[...] = jnp.sum(onehot_sum, axis=0, keepdims=True).astype(jnp.int32)

    tile = lambda cols: pl.BlockSpec((tt, cols), lambda i, *_: (i, 0))  # noqa: E731
    whole = lambda shape: pl.BlockSpec(shape, lambda i, *_: (0,) * len(shape))  # noqa: E731
    out_shape = [
        jax.ShapeDtypeStruct((t, k), jnp.int32),
        jax.ShapeDtypeStruct((t, k), jnp.float32),
        jax.ShapeDtypeStruct((t, e), jnp.float32),
        jax.ShapeDtypeStruct((t, e), jnp.float32),
        jax.ShapeDtypeStruct((num_tiles, 1, e), jnp.int32),
    ]
    out_specs = [tile(k), tile(k), tile(e), tile(e),
                 pl.BlockSpec((None, 1, e), lambda i, *_: (i, 0, 0))]  # fmt: skip
    return kernel, [tile(d), whole((d, e)), whole((1, e))], out_specs, out_shape


def _gating_fwd_impl(x_TxD, w_DxE, bias_E, k, score, normalize, scale, tt, backend, interpret):
    t = x_TxD.shape[0]
    x = common.pad_rows(x_TxD, tt)
    bias_1xE = bias_E.astype(jnp.float32).reshape(1, -1)
    kernel, in_specs, out_specs, out_shape = _gating_kernel(
        x.shape[0], x.shape[1], w_DxE.shape[1], k, score, normalize, scale, tt
    )
    num_valid = jnp.full((1,), t, jnp.int32)
    grid = (x.shape[0] // tt,)
    if backend == "tpu":  # the valid-token count is a prefetched scalar
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs
        )
        params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",))
        call = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                              compiler_params=params, interpret=interpret)  # fmt: skip
    else:  # Triton (named: JAX may default GPU kernels to Mosaic GPU): an ordinary input
        in_specs = [pl.BlockSpec((1,), lambda i: (0,)), *in_specs]
        params = None if interpret else pltriton.CompilerParams(num_warps=4)
        call = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, compiler_params=params,
                              interpret=interpret)  # fmt: skip
    outs = call(num_valid, x, w_DxE, bias_1xE)
    ids, wts, probs, logits, counts = outs
    return ids[:t], wts[:t], counts.sum((0, 1)), probs[:t], logits[:t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _gating(x, w, bias, k, score, normalize, scale, tt, backend, interpret):
    return _gating_fwd_impl(x, w, bias, k, score, normalize, scale, tt, backend, interpret)


def _gating_fwd(x, w, bias, k, score, normalize, scale, tt, backend, interpret):
    outs = _gating_fwd_impl(x, w, bias, k, score, normalize, scale, tt, backend, interpret)
    return outs, (x, w, bias, outs[0])


def _gating_bwd(k, score, normalize, scale, tt, backend, interpret, res, cts):
    x, w, bias, ids = res
    _, d_wts, _, d_probs, d_logits = cts
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    logits = jnp.dot(x32, w32, precision=_HIGHEST)

    def outputs(logits):
        probs = _scores(logits, score)
        return _combine(probs, ids, normalize, scale), probs, logits

    _, vjp = jax.vjp(outputs, logits)
    (dl,) = vjp((d_wts, d_probs, d_logits))
    dx = jnp.dot(dl, w32.T, precision=_HIGHEST).astype(x.dtype)
    dw = jnp.dot(x32.T, dl, precision=_HIGHEST).astype(w.dtype)
    return dx, dw, jnp.zeros_like(bias)


_gating.defvjp(_gating_fwd, _gating_bwd)


def top_k_gating(
    x_TxD: jax.Array,
    w_DxE: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    bias: jax.Array | None = None,
    normalize: bool = False,
    scale: float = 1.0,
    block_tokens: int | None = None,
    backend: str | None = None,
    interpret: bool = False,
):
    """Fused router: logits, scores, top-k with a selection bias, weights and expert counts.

    Args:
      x_TxD: `[T, D]` router input (any float dtype; the matmul runs in float32).
      w_DxE: `[D, E]` router weights.
      k: experts per token, `1 <= k <= E`.
      score: "softmax" or "sigmoid".
      bias: `[E]` added to the scores for selection only (no gradient).
      normalize: divide the k weights by their sum (only when `k > 1`).
      scale: multiplies the weights after normalising.
      block_tokens: tokens per program (default 128 compiled, the whole batch up to 256 when
        interpreted).
      backend, interpret: as in `gmm`.

    Returns:
      `(expert_ids [T, k] int32, weights [T, k] f32, counts [E] int32, probs [T, E] f32,
      logits [T, E] f32)`; differentiable in `x` and `w` through weights, probs and logits.
      Ties go to the lowest expert index, as in `jax.lax.top_k`.
    """
    backend = common.default_backend(backend)
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")
    t, d = x_TxD.shape
    e = w_DxE.shape[-1]
    if w_DxE.shape != (d, e):
        raise ValueError(f"router weights {w_DxE.shape} do not match x [T, {d}]")
    if not 1 <= k <= e:
        raise ValueError(f"{k=} must be in [1, num_experts={e}]")
    bias = jnp.zeros((e,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if bias.shape != (e,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({e},)")
    tt = block_tokens or (min(256, max(8, 1 << max(t - 1, 0).bit_length())) if interpret else 128)
    check_block_tokens(tt, backend, interpret)
    if t == 0:
        z = jnp.zeros((0, k))
        return z.astype(jnp.int32), z, jnp.zeros(e, jnp.int32), jnp.zeros((0, e)), jnp.zeros((0, e))
    return _gating(x_TxD, w_DxE, bias, k, score, bool(normalize and k > 1), float(scale), tt,
                   backend, interpret)  # fmt: skip
