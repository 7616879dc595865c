"""Fused top-k gating: router matmul, softmax / sigmoid, selection bias and top-k in one kernel.

Forward: one program per tile of tokens accumulates `logits = x @ w` (float32, highest precision)
over chunks of the model width `D`, so no program holds the whole `[D, E]` router weight: on TPU
the chunks are a sequential grid axis with the logits block resident, on GPU a loop inside the
program (Triton programs cannot accumulate across the grid). It then computes the scores and picks
the k best `scores + bias` by k rounds of "max, lowest index among the maxima, mask it" (the tie
rule of `jax.lax.top_k`), and writes expert ids, combine weights, scores, logits and the tile's
per-expert counts (summed outside, so tiles stay independent on every backend).

Backward (`jax.custom_vjp`): a second kernel turns the cotangents of weights, scores and logits
into the logits' cotangent `dl` per tile of tokens, from the saved logits and ids (the softmax /
sigmoid and renormalisation derivatives written out with one-hot masks; the chosen ids are held
fixed). The router gradients `dx = dl @ w.T` and `dw = x.T @ dl` are dense matmuls, left to XLA
(cuBLAS / the MXU at their roofline).

Triton needs power-of-two arrays and dot sides >= 16, so on GPU the experts, the k slots and the
model width are padded (padded experts get `-inf` logits: zero score, never chosen) and the
padding is sliced off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common

SCORES = ("softmax", "sigmoid")
_HIGHEST = jax.lax.Precision.HIGHEST
_WHOLE = pl.no_block_spec  # an unblocked input: the kernel indexes it itself


def _scores(logits_TxE: jax.Array, score: str) -> jax.Array:
    """`jax.nn.softmax`'s formula (equal up to rounding; plain ops lower on every backend)."""
    if score == "sigmoid":
        return jax.nn.sigmoid(logits_TxE)
    unnormalized = jnp.exp(logits_TxE - jnp.max(logits_TxE, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one gating call (hashable: a `custom_vjp` non-diff argument).

    `t, d, e, k`: tokens, model width, experts and slots; `n_groups, top_groups, group_score`
    the group-limited selection (None: off); `tt` tokens per program, `td` columns of `x` per
    step of the logits matmul; `tp, dp, ep, kp` the padded sizes.
    """

    t: int
    d: int
    e: int
    k: int
    score: str
    normalize: bool
    scale: float
    n_groups: int | None
    top_groups: int | None
    group_score: str
    tt: int
    td: int
    ep: int
    kp: int
    backend: str
    interpret: bool

    @property
    def tp(self) -> int:
        return -(-self.t // self.tt) * self.tt

    @property
    def dp(self) -> int:
        return -(-self.d // self.td) * self.td


def check_block_tokens(tt: int, backend: str, interpret: bool) -> None:
    """Raises a ValueError naming `tt` if it cannot tile the tokens on `backend`."""
    if not isinstance(tt, int) or tt <= 0:
        raise ValueError(f"block_tokens={tt!r} must be a positive int")
    if interpret:
        return
    if backend == "tpu" and tt % 8:
        raise ValueError(f"block_tokens={tt} is not a multiple of 8 (TPU sublanes)")
    if backend == "gpu" and (tt < 16 or tt & (tt - 1)):
        raise ValueError(f"block_tokens={tt} is not a power of two >= 16 (GPU Triton blocks)")


def check_block_d(td: int, d: int, backend: str, interpret: bool) -> None:
    """Raises a ValueError naming `td` if it cannot chunk the model width `d` on `backend`."""
    if not isinstance(td, int) or td <= 0:
        raise ValueError(f"block_d={td!r} must be a positive int")
    if backend == "tpu" and d % td:
        raise ValueError(f"block_d={td} does not divide the model width {d}; pick a divisor")
    if interpret:
        return
    if backend == "tpu" and td % 128 and td != d:
        raise ValueError(f"block_d={td} is neither a multiple of 128 nor the model width {d} (TPU)")
    if backend == "gpu" and (td < 16 or td & (td - 1)):
        raise ValueError(f"block_d={td} is not a power of two >= 16 (GPU Triton blocks)")


def _default_blocks(t: int, d: int, ep: int, backend: str, interpret: bool) -> tuple[int, int]:
    """`(tokens per program, columns per matmul step)` for `ep` (padded) experts."""
    if interpret:  # few, large programs: the interpreter's cost is per grid step
        tt = min(256, _pow2_at_least(t, 8))
        return tt, (d if backend == "tpu" else min(_pow2_at_least(d, 16), 512))
    if backend == "tpu":
        return 128, next((c for c in (512, 256, 128) if d % c == 0), d)
    # Triton keeps about five `[tt, ep]` float32 arrays per program in registers (logits, scores,
    # selection, one-hots, iota): 4096 elements each are 32 registers per thread of 4 warps.
    tt = max(16, min(128, 4096 // ep))
    return tt, max(16, min(64, 4096 // ep))


def _select(logits_TxE: jax.Array, bias_1xE: jax.Array, row0: jax.Array, plan: _Plan):
    """Scores and top-k of one tile of float32 logits (padded experts masked out).

    Returns `(ids [tt, kp] int32, weights [tt, kp], probs [tt, ep], logits [tt, ep],
    counts [1, ep] int32)`; slots past `k` and rows past `t` carry no counts.
    """
    tt, ep, kp = logits_TxE.shape[0], plan.ep, plan.kp
    col_E = _expert_index(tt, ep)
    col_K = jax.lax.broadcasted_iota(jnp.int32, (tt, kp), 1)
    logits = jnp.where(col_E < plan.e, logits_TxE, -jnp.inf)
    probs = _scores(logits, plan.score)
    sel = jnp.where(col_E < plan.e, probs + bias_1xE, -jnp.inf)
    if plan.n_groups is not None:
        sel = _group_limited(sel, col_E, plan)
    ids = jnp.zeros((tt, kp), jnp.float32)
    wts = jnp.zeros((tt, kp), jnp.float32)
    onehot_sum = jnp.zeros((tt, ep), jnp.float32)
    for j in range(plan.k):
        _, idx = _first_max(sel, col_E)
        hit = col_E == idx
        ids = jnp.where(col_K == j, idx, ids)
        wts = jnp.where(col_K == j, jnp.sum(jnp.where(hit, probs, 0.0), -1, keepdims=True), wts)
        onehot_sum += hit.astype(jnp.float32)
        sel = jnp.where(hit, -jnp.inf, sel)
    if plan.normalize:
        wts = wts / jnp.sum(wts, axis=-1, keepdims=True)
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tt, 1), 0)
    onehot_sum = jnp.where(rows < plan.t, onehot_sum, 0.0)
    counts = jnp.sum(onehot_sum, axis=0, keepdims=True).astype(jnp.int32)
    return ids.astype(jnp.int32), wts * plan.scale, probs, logits, counts


def _first_max(values_TxE: jax.Array, col_E: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(max, lowest column holding it)` per row, `[tt, 1]` each: `jax.lax.top_k`'s tie rule."""
    best = jnp.max(values_TxE, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(values_TxE == best, col_E, jnp.inf), axis=-1, keepdims=True)
    return best, first


def _group_limited(sel_TxE: jax.Array, col_E: jax.Array, plan: _Plan) -> jax.Array:
    """`sel` with the experts outside each token's `top_groups` best groups masked to -inf.

    Group `g` holds experts `[g * E / n_groups, (g + 1) * E / n_groups)`; its score is the sum of
    its two best selection scores ("top2_sum", DeepSeek-V3) or its best one ("max",
    DeepSeek-V2); ties between groups go to the lowest group index.
    """
    size = plan.e // plan.n_groups
    members = [(col_E >= g * size) & (col_E < (g + 1) * size) for g in range(plan.n_groups)]
    scores_G = []
    for in_group in members:
        rest, total = jnp.where(in_group, sel_TxE, -jnp.inf), 0.0
        for _ in range(common.GROUP_SCORES[plan.group_score]):
            best, first = _first_max(rest, col_E)
            total = total + best
            rest = jnp.where(col_E == first, -jnp.inf, rest)
        scores_G.append(total)
    keep = jnp.zeros(sel_TxE.shape, bool)
    for _ in range(plan.top_groups):
        best = functools.reduce(jnp.maximum, scores_G)
        taken_any = jnp.zeros(best.shape, bool)
        for g, in_group in enumerate(members):
            taken = (scores_G[g] == best) & ~taken_any
            taken_any = taken_any | taken
            keep = keep | (taken & in_group)
            scores_G[g] = jnp.where(taken, -jnp.inf, scores_G[g])
    return jnp.where(keep, sel_TxE, -jnp.inf)


def _expert_index(tt: int, ep: int) -> jax.Array:
    """`[tt, ep]` float32 column index. Indices are reduced as float32 (exact below 2^24), which
    Mosaic reduces on every TPU generation, unlike int32."""
    return jax.lax.broadcasted_iota(jnp.int32, (tt, ep), 1).astype(jnp.float32)


def _dot32(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), (((1,), (0,)), ((), ())),
        precision=_HIGHEST, preferred_element_type=jnp.float32,
    )  # fmt: skip


def _compiler_params(plan: _Plan, tpu_semantics: tuple[str, ...] = ()):
    """The backend's compiler options (None when interpreted)."""
    if plan.backend != "tpu":
        return common.triton_params(plan.interpret, num_warps=4)
    return common.tpu_params(plan.interpret, tpu_semantics)


def _row_tile(plan: _Plan, cols: int) -> pl.BlockSpec:
    """`[tt, cols]` block of token tile `i` (the first grid axis)."""
    return pl.BlockSpec((plan.tt, cols), lambda i, *_: (i, 0))


def _out_specs(plan: _Plan) -> list[pl.BlockSpec]:
    """Blocks of the forward's outputs: ids, weights, probs, logits, per-tile counts."""
    counts = pl.BlockSpec((None, 1, plan.ep), lambda i, *_: (i, 0, 0))
    return [*(_row_tile(plan, c) for c in (plan.kp, plan.kp, plan.ep, plan.ep)), counts]


def _store(out_refs, values) -> None:
    for ref, value in zip(out_refs, values, strict=True):
        ref[...] = value


def _forward_tpu(x, w, bias, plan: _Plan):
    """Grid (token tile, D chunk): the logits block stays resident while the chunks add up."""
    tt, td, nd = plan.tt, plan.td, plan.dp // plan.td

    def kernel(x_ref, w_ref, bias_ref, ids_ref, wts_ref, probs_ref, logits_ref, counts_ref):
        c, row0 = pl.program_id(1), pl.program_id(0) * tt  # (program ids outside `pl.when`)

        @pl.when(c == 0)
        def _init():
            logits_ref[...] = jnp.zeros_like(logits_ref)

        logits_ref[...] += _dot32(x_ref[...], w_ref[...])

        @pl.when(c == nd - 1)
        def _route():
            outs = _select(logits_ref[...], bias_ref[...], row0, plan)
            _store((ids_ref, wts_ref, probs_ref, logits_ref, counts_ref), outs)

    in_specs = [
        pl.BlockSpec((tt, td), lambda i, c: (i, c)),
        pl.BlockSpec((td, plan.ep), lambda i, c: (c, 0)),
        pl.BlockSpec((1, plan.ep), lambda i, c: (0, 0)),
    ]
    params = _compiler_params(plan, ("parallel", "arbitrary"))
    return pl.pallas_call(
        kernel, grid=(plan.tp // tt, nd), in_specs=in_specs, out_specs=_out_specs(plan),
        out_shape=_forward_shapes(plan), compiler_params=params, interpret=plan.interpret,
    )(x, w, bias)  # fmt: skip


def _forward_gpu(x, w, bias, plan: _Plan):
    """Grid (token tile,): each program loops over the D chunks of its rows and of `w`."""
    tt, td, nd = plan.tt, plan.td, plan.dp // plan.td

    def kernel(x_ref, w_ref, bias_ref, *out_refs):
        row0 = pl.program_id(0) * tt

        def step(c, acc):
            cols = pl.ds(c * td, td)
            return acc + _dot32(x_ref[pl.ds(row0, tt), cols], w_ref[cols, :])

        logits = jax.lax.fori_loop(0, nd, step, jnp.zeros((tt, plan.ep), jnp.float32))
        _store(out_refs, _select(logits, bias_ref[...], row0, plan))

    return pl.pallas_call(
        kernel, grid=(plan.tp // tt,), in_specs=[_WHOLE, _WHOLE, _WHOLE],
        out_specs=_out_specs(plan), out_shape=_forward_shapes(plan),
        compiler_params=_compiler_params(plan), interpret=plan.interpret,
    )(x, w, bias)  # fmt: skip


def _forward_shapes(plan: _Plan):
    tp, ep, kp = plan.tp, plan.ep, plan.kp
    return [
        jax.ShapeDtypeStruct((tp, kp), jnp.int32),
        jax.ShapeDtypeStruct((tp, kp), jnp.float32),
        jax.ShapeDtypeStruct((tp, ep), jnp.float32),
        jax.ShapeDtypeStruct((tp, ep), jnp.float32),
        jax.ShapeDtypeStruct((tp // plan.tt, 1, ep), jnp.int32),
    ]


def _pad(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """`a` with zeros appended up to `[rows, cols]` (no copy when it already has that shape)."""
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _forward_padded(x_TxD, w_DxE, bias_E, plan: _Plan):
    """The kernel's outputs at the padded sizes `[tp, kp]` / `[tp, ep]`, counts `[ep]`."""
    x = _pad(x_TxD, plan.tp, plan.dp)
    w = _pad(w_DxE, plan.dp, plan.ep)
    bias = _pad(bias_E.astype(jnp.float32).reshape(1, -1), 1, plan.ep)
    forward = _forward_tpu if plan.backend == "tpu" else _forward_gpu
    ids, wts, probs, logits, counts = forward(x, w, bias, plan)
    return ids, wts, probs, logits, counts.sum((0, 1))


def _unpad(outs, plan: _Plan):
    ids, wts, probs, logits, counts = outs
    t, e, k = plan.t, plan.e, plan.k
    return ids[:t, :k], wts[:t, :k], counts[:e], probs[:t, :e], logits[:t, :e]


def _dlogits_kernel(plan: _Plan):
    """Per tile of tokens: `dl`, the cotangent of the logits, from the saved logits and ids."""

    def kernel(logits_ref, ids_ref, d_wts_ref, d_probs_ref, d_logits_ref, dl_ref):
        tt, ep, kp = plan.tt, plan.ep, plan.kp
        probs = _scores(logits_ref[...], plan.score)
        ids, d_wts = ids_ref[...].astype(jnp.float32), d_wts_ref[...]
        col_E = _expert_index(tt, ep)
        col_K = jax.lax.broadcasted_iota(jnp.int32, (tt, kp), 1)
        slot = lambda a, j: jnp.sum(jnp.where(col_K == j, a, 0.0), -1, keepdims=True)  # noqa: E731
        hits = [col_E == slot(ids, j) for j in range(plan.k)]
        g = [slot(d_wts, j) * plan.scale for j in range(plan.k)]
        if plan.normalize:  # w_j = p_j / S: dp_i = g_i / S - sum_j g_j p_j / S^2 on chosen i
            p = [jnp.sum(jnp.where(hit, probs, 0.0), -1, keepdims=True) for hit in hits]
            total = sum(p)
            mean_g = sum(gj * pj for gj, pj in zip(g, p, strict=True)) / total
            g = [(gj - mean_g) / total for gj in g]
        d_probs = d_probs_ref[...]
        for hit, gj in zip(hits, g, strict=True):
            d_probs += jnp.where(hit, gj, 0.0)
        if plan.score == "sigmoid":
            dl = d_probs * probs * (1.0 - probs)
        else:
            dl = probs * (d_probs - jnp.sum(d_probs * probs, -1, keepdims=True))
        dl_ref[...] = d_logits_ref[...] + dl

    return kernel


def _dlogits(logits, ids, d_wts, d_probs, d_logits, plan: _Plan):
    """`[tp, ep]` cotangent of the padded logits (zeros on padded experts and tokens)."""
    ep, kp = plan.ep, plan.kp
    tile = functools.partial(_row_tile, plan)
    params = _compiler_params(plan, ("parallel",))
    return pl.pallas_call(
        _dlogits_kernel(plan), grid=(plan.tp // plan.tt,),
        in_specs=[tile(ep), tile(kp), tile(kp), tile(ep), tile(ep)], out_specs=tile(ep),
        out_shape=jax.ShapeDtypeStruct((plan.tp, ep), jnp.float32), compiler_params=params,
        interpret=plan.interpret,
    )(logits, ids, d_wts, d_probs, d_logits)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gating(x, w, bias, plan: _Plan):
    return _unpad(_forward_padded(x, w, bias, plan), plan)


def _gating_fwd(x, w, bias, plan: _Plan):
    outs = _forward_padded(x, w, bias, plan)
    ids, _, _, logits, _ = outs
    return _unpad(outs, plan), (x, w, bias, ids, logits)


def _gating_bwd(plan: _Plan, res, cts):
    x, w, bias, ids, logits = res
    _, d_wts, _, d_probs, d_logits = cts
    tp, ep, kp = plan.tp, plan.ep, plan.kp
    dl = _dlogits(logits, ids, _pad(d_wts, tp, kp), _pad(d_probs, tp, ep),
                  _pad(d_logits, tp, ep), plan)[: plan.t, : plan.e]  # fmt: skip
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
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
    n_groups: int | None = None,
    top_groups: int | None = None,
    group_score: str = "top2_sum",
    renorm_when_k1: bool = False,
    block_tokens: int | None = None,
    block_d: int | None = None,
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
      normalize: divide the k weights by their sum (only when `k > 1` unless `renorm_when_k1`).
      scale: multiplies the weights after normalising.
      n_groups, top_groups: group-limited selection (DeepSeek-V2/V3): experts split into
        `n_groups` equal groups, scored by `group_score`, and only each token's `top_groups` best
        groups eligible. Both or neither.
      group_score: "top2_sum" (the sum of a group's two best selection scores, DeepSeek-V3) or
        "max" (its best one, DeepSeek-V2).
      renorm_when_k1: renormalise a single weight too (it becomes 1).
      block_tokens: tokens per program (default: 128 on TPU; on GPU 4096 // E_padded up to 128; the
        whole batch up to 256 when interpreted).
      block_d: columns of `x` per step of the router matmul (default: the largest of 512 / 256 /
        128 dividing D on TPU, else D; 4096 // E_padded up to 64 on GPU).
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
    common.check_groups(e, k, n_groups, top_groups, group_score)
    if backend == "gpu":  # Triton: power-of-two arrays, dot sides >= 16
        ep, kp = _pow2_at_least(e, 16), _pow2_at_least(k)
    else:
        ep, kp = e, k
    tt, td = _default_blocks(t, d, ep, backend, interpret)
    tt, td = block_tokens or tt, block_d or td
    check_block_tokens(tt, backend, interpret)
    check_block_d(td, d, backend, interpret)
    if t == 0:
        z = jnp.zeros((0, k))
        return z.astype(jnp.int32), z, jnp.zeros(e, jnp.int32), jnp.zeros((0, e)), jnp.zeros((0, e))
    normalize = bool(normalize and (k > 1 or renorm_when_k1))
    plan = _Plan(t, d, e, k, score, normalize, float(scale), n_groups, top_groups, group_score,
                 tt, td, ep, kp, backend, interpret)  # fmt: skip
    return _gating(x_TxD, w_DxE, bias, plan)
