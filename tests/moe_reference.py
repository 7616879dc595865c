"""Plain reference implementations of MoE routing, losses, capacity and the MoE layer.

Written from the math of docs/algorithms.md, not from jmoe's code, and deliberately slow and
obvious: per-token Python loops, float64 NumPy where no gradient is needed. This module never
imports jmoe; it is the test oracle.

Conventions (docs/algorithms.md, the layer's documented stats):
  - ties go to the lower expert index everywhere (`jax.lax.top_k`'s rule), implemented as a stable
    sort on (-value, index);
  - an unused slot holds `num_experts` and has `valid == False`;
  - parameter tree of the MoE layer: `params['router']['kernel']` `[D, E]`,
    `params['experts']['w_gate' | 'w_up']` `[E, D, F]` (`w_gate` only for "swiglu"),
    `params['experts']['w_down']` `[E, F, D]`, `params['shared']['w_gate' | 'w_up' | 'w_down']`
    `[D, Fs]`, `[D, Fs]`, `[Fs, D]`, `params['shared_gate']['kernel']` `[D, 1]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Routing (docs/algorithms.md)
# ----------------------------------------------------------------------------------------------


def _order_desc(values: np.ndarray) -> np.ndarray:
    """Indices of `values` sorted by descending value, ties to the lower index."""
    values = np.asarray(values, np.float64)
    idx = np.arange(values.shape[0])
    return np.lexsort((idx, -values))  # last key is primary: -value, then index


def ref_scores(logits: np.ndarray, score: str) -> np.ndarray:
    """Softmax (over experts) or sigmoid scores of `[T, E]` logits, float64."""
    z = np.asarray(logits, np.float64)
    if score == "softmax":
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)
    if score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    raise ValueError(f"unknown score {score!r}")


def ref_top_k(
    logits,
    k: int,
    score: str = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    bias=None,
    n_groups: int | None = None,
    top_groups: int | None = None,
    renorm_when_k1: bool = False,
    group_score: str = "top2_sum",
):
    """Token-choice top-k routing, one token at a time.

    Selection uses `scores + bias`; with `n_groups`/`top_groups` only the experts of each token's
    `top_groups` best groups are eligible (group score = the sum of its 2 best biased scores for
    "top2_sum", DeepSeek-V3, or its best one for "max", DeepSeek-V2; ties to the lower group;
    other groups masked to -inf). Weights are the UNBIASED scores of
    the chosen experts, renormalised over the k only if `normalize and (k > 1 or renorm_when_k1)`,
    then multiplied by `scale`.

    Returns:
      ids `[T, k]` int64 in descending selection order, weights `[T, k]` float64,
      probs `[T, E]` float64.
    """
    probs = ref_scores(logits, score)
    t_count, e_count = probs.shape
    b = np.zeros(e_count) if bias is None else np.asarray(bias, np.float64)
    ids = np.zeros((t_count, k), np.int64)
    weights = np.zeros((t_count, k), np.float64)
    for t in range(t_count):
        sel = probs[t] + b
        if n_groups is not None:
            m = e_count // n_groups
            per_group = {"top2_sum": 2, "max": 1}[group_score]
            group_scores = []
            for g in range(n_groups):
                members = sel[g * m : (g + 1) * m]
                best = members[_order_desc(members)[:per_group]]
                group_scores.append(best.sum())
            kept_groups = set(_order_desc(np.array(group_scores))[:top_groups].tolist())
            sel = np.array([sel[e] if e // m in kept_groups else -np.inf for e in range(e_count)])
        chosen = _order_desc(sel)[:k]
        ids[t] = chosen
        w = probs[t, chosen]
        if normalize and (k > 1 or renorm_when_k1):
            w = w / w.sum()
        weights[t] = w * scale
    return ids, weights, probs


def ref_weights_jnp(logits, ids, score="softmax", normalize=False, scale=1.0, renorm_when_k1=False):
    """Differentiable (jnp) combine weights `[T, k]` of FIXED expert ids `[T, k]` (no bias)."""
    logits = jnp.asarray(logits, jnp.float32)
    probs = jax.nn.softmax(logits, -1) if score == "softmax" else jax.nn.sigmoid(logits)
    ids = np.asarray(ids)
    k = ids.shape[1]
    rows = []
    for t in range(ids.shape[0]):
        w = jnp.stack([probs[t, int(e)] for e in ids[t]])
        if normalize and (k > 1 or renorm_when_k1):
            w = w / jnp.sum(w)
        rows.append(w * scale)
    return jnp.stack(rows)


# ----------------------------------------------------------------------------------------------
# Losses (docs/algorithms.md)
# ----------------------------------------------------------------------------------------------


def _mask(num_tokens: int, token_mask) -> np.ndarray:
    if token_mask is None:
        return np.ones(num_tokens, bool)
    return np.asarray(token_mask, bool).reshape(num_tokens)


def _balance_from_counts(counts, probs, mask, n, k, normalization):
    """`len(counts) * sum_i f_i P_i` for the per-expert `counts` over the first len(counts) columns.

    `probs` may be a jax array (then the result is differentiable w.r.t. it).
    """
    num_cols = len(counts)
    if normalization in ("switch_top1", "per_assignment"):
        f = counts / n
    elif normalization == "per_assignment_over_k":
        f = counts / (k * n)
    else:
        raise ValueError(normalization)
    if isinstance(probs, jax.Array):
        p, xp = jnp.asarray(probs, jnp.float32), jnp
    else:
        p, xp = np.asarray(probs, np.float64), np
    p_rows = p / xp.sum(p, -1, keepdims=True)
    p_mean = xp.sum(p_rows[np.flatnonzero(mask)][:, :num_cols], 0) / n
    return num_cols * xp.sum(f * p_mean)


def ref_load_balance(ids, valid, probs, num_experts: int, normalization: str, token_mask=None):
    """`E * sum_i f_i P_i` (docs/algorithms.md).

    f_i (counted over unmasked tokens, valid slots only):
      "switch_top1": tokens whose slot 0 (first choice) is i, / T;
      "per_assignment": assignments to i, / T;
      "per_assignment_over_k": assignments to i, / (k T).
    P_i = mean over unmasked tokens of the probs row-normalised to sum 1. f is a constant (no
    gradient); `probs` may be a jax array, and then the result is differentiable in it.
    """
    ids = np.asarray(ids)
    valid = np.asarray(valid, bool)
    t_count, k = ids.shape
    mask = _mask(t_count, token_mask)
    n = max(int(mask.sum()), 1)
    counts = np.zeros(num_experts)
    slots = 1 if normalization == "switch_top1" else k
    for t in range(t_count):
        if not mask[t]:
            continue
        for j in range(slots):
            if valid[t, j] and ids[t, j] < num_experts:
                counts[ids[t, j]] += 1
    return _balance_from_counts(counts, probs, mask, n, k, normalization)


def ref_z_loss(logits, token_mask=None) -> float:
    """Mean over unmasked tokens of logsumexp(logits)^2 (ST-MoE)."""
    z = np.asarray(logits, np.float64)
    mask = _mask(z.shape[0], token_mask)
    vals = []
    for t in range(z.shape[0]):
        if mask[t]:
            mx = z[t].max()
            vals.append((mx + math.log(np.exp(z[t] - mx).sum())) ** 2)
    return float(np.sum(vals) / max(len(vals), 1))


def ref_entropy(probs, token_mask=None) -> float:
    """Mean over unmasked tokens of -sum p log p of the row-normalised probs (0 log 0 = 0)."""
    p = np.asarray(probs, np.float64)
    mask = _mask(p.shape[0], token_mask)
    vals = []
    for t in range(p.shape[0]):
        if mask[t]:
            row = p[t] / p[t].sum()
            vals.append(-sum(x * math.log(x) for x in row if x > 0))
    return float(np.sum(vals) / max(len(vals), 1))


def ref_sequence_balance(probs, k: int, num_experts: int, seq_len: int, token_mask=None) -> float:
    """DeepSeek-V3 sequence-wise balance (docs/algorithms.md), mean over sequences.

    Per sequence with L_valid unmasked tokens: top-k recomputed on the unbiased probs,
    f_i = E / (k L_valid) * #{t: i in top-k(t)}, P_i = mean of the row-normalised probs,
    loss_b = sum_i f_i P_i; sequences that are all padding are left out of the mean.
    """
    p = np.asarray(probs, np.float64)[:, :num_experts]
    t_count = p.shape[0]
    mask = _mask(t_count, token_mask)
    losses = []
    for start in range(0, t_count, seq_len):
        counts = np.zeros(num_experts)
        p_sum = np.zeros(num_experts)
        n = 0
        for t in range(start, start + seq_len):
            if not mask[t]:
                continue
            n += 1
            counts[_order_desc(p[t])[:k]] += 1
            p_sum += p[t] / p[t].sum()
        if n == 0:
            continue
        f = num_experts / (k * n) * counts
        losses.append(float(np.sum(f * p_sum / n)))
    return float(np.mean(losses)) if losses else 0.0


# ----------------------------------------------------------------------------------------------
# Capacity (docs/algorithms.md, position priority)
# ----------------------------------------------------------------------------------------------


def ref_capacity(ids, num_experts: int, capacity: int, valid=None) -> np.ndarray:
    """Kept mask `[T, k]` under per-expert capacity with position priority.

    Every token's FIRST choice is queued (in token order) before any token's SECOND choice, and so
    on; an assignment is kept iff its position in its expert's queue is `< capacity`. Invalid slots
    (or ids >= num_experts) take no place in any queue and are never kept.
    """
    ids = np.asarray(ids)
    t_count, k = ids.shape
    valid = np.ones((t_count, k), bool) if valid is None else np.asarray(valid, bool)
    fill = np.zeros(num_experts, np.int64)
    kept = np.zeros((t_count, k), bool)
    for j in range(k):
        for t in range(t_count):
            e = int(ids[t, j])
            if not valid[t, j] or e >= num_experts:
                continue
            kept[t, j] = fill[e] < capacity
            fill[e] += 1
    return kept


# ----------------------------------------------------------------------------------------------
# The MoE layer (docs/algorithms.md), per token and per slot, in jnp (differentiable)
# ----------------------------------------------------------------------------------------------


def _act(h, activation: str):
    if activation == "gelu":
        return jax.nn.gelu(h, approximate=False)
    if activation == "relu":
        return jax.nn.relu(h)
    raise ValueError(f"unknown activation {activation!r}")


def _clamped_swiglu(gate, up, alpha: float, limit: float):
    """GPT-OSS: gate clamped above at `limit`, up clipped to [-limit, limit],
    `(up + 1) * gate * sigmoid(alpha * gate)`."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1.0) * gate / (1.0 + jnp.exp(-alpha * gate))


def ref_expert_ffn(
    experts: dict, e: int, x_D, activation: str, alpha: float = 1.702, limit: float = 7.0
):
    """FFN of routed expert `e` on one token `[D]`, with the biases `b_gate` / `b_up` / `b_down`
    when `experts` has them (added after each projection).

    "swiglu": (silu(x Wg + bg) * (x Wu + bu)) Wd + bd; "clamped_swiglu": GPT-OSS's unit with
    `alpha`, `limit`; "gelu": gelu(x Wu + bu) Wd + bd (exact erf gelu); "relu" likewise.
    """

    def proj(name):
        y = x_D @ experts["w_" + name][e]
        return y + experts["b_" + name][e] if "b_" + name in experts else y

    if activation == "swiglu":
        h = jax.nn.silu(proj("gate")) * proj("up")
    elif activation == "clamped_swiglu":
        h = _clamped_swiglu(proj("gate"), proj("up"), alpha, limit)
    else:
        h = _act(proj("up"), activation)
    y_D = h @ experts["w_down"][e]
    return y_D + experts["b_down"][e] if "b_down" in experts else y_D


def ref_shared_ffn(shared: dict, x_D, activation: str, alpha: float = 1.702, limit: float = 7.0):
    """The fused shared expert on one token `[D]` (same activation rule as the routed experts)."""
    if activation == "swiglu":
        h = jax.nn.silu(x_D @ shared["w_gate"]) * (x_D @ shared["w_up"])
    elif activation == "clamped_swiglu":
        h = _clamped_swiglu(x_D @ shared["w_gate"], x_D @ shared["w_up"], alpha, limit)
    else:
        h = _act(x_D @ shared["w_up"], activation)
    return h @ shared["w_down"]


def ref_moe_forward(
    params,
    x_TxD,
    selection_ids,
    selection_weights,
    kept,
    activation: str,
    shared: str | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
):
    """MoE output `[T, D]` for GIVEN expert ids `[T, k]`, weights `[T, k]` and kept mask `[T, k]`
    (`alpha`, `limit`: the "clamped_swiglu" constants).

    `y_t = sum_j kept[t, j] * w[t, j] * FFN_{ids[t, j]}(x_t) + shared(x_t) * gate_t`, with
    `gate_t = sigmoid(x_t @ params['shared_gate']['kernel'])` if `shared == "gated"`, 1 if
    `shared == "plain"`, and no shared term if `shared is None`. Slots with `kept == False` or
    `ids >= E` contribute exactly nothing (no renormalisation of the rest). `selection_ids` and
    `kept` must be concrete (NumPy-convertible); `params`, `x_TxD` and `selection_weights` may be
    traced, so `jax.grad` works through this function.
    """
    ids = np.asarray(selection_ids)
    kept = np.asarray(kept, bool)
    experts = params["experts"]
    num_experts = experts["w_down"].shape[0]
    x_TxD = jnp.asarray(x_TxD)
    rows = []
    for t in range(ids.shape[0]):
        x_D = x_TxD[t]
        y_D = jnp.zeros((experts["w_down"].shape[-1],), x_TxD.dtype)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if kept[t, j] and e < num_experts:
                ffn = ref_expert_ffn(experts, e, x_D, activation, alpha, limit)
                y_D = y_D + selection_weights[t, j] * ffn
        if shared is not None:
            s_D = ref_shared_ffn(params["shared"], x_D, activation, alpha, limit)
            if shared == "gated":
                s_D = s_D * jax.nn.sigmoid(x_D @ params["shared_gate"]["kernel"])[0]
            elif shared != "plain":
                raise ValueError(f"shared={shared!r} must be None, 'plain' or 'gated'")
            y_D = y_D + s_D
        rows.append(y_D)
    return jnp.stack(rows)


def ref_moe(params, x_TxD, cfg: dict, ids, kept=None):
    """MoE output `[T, D]` with router weights recomputed (differentiably) from `params`.

    The expert ids `[T, k]` are fixed (compute them outside, e.g. with `ref_top_k` on
    `x @ router_kernel` plus any bias); the weights are `probs[t, ids[t]]` with
    `probs = softmax/sigmoid(x @ params['router']['kernel'])` in float32, renormalised over the k
    if `normalize and (k > 1 or renorm_when_k1)`, times `scale`, so gradients reach the router.

    `cfg` is a dict using MoEConfig field names (`dataclasses.asdict(MoEConfig(...))` works: the
    router's fields are read from its "router" entry; extra keys are ignored): `score`
    ("softmax"), `normalize` (False), `renorm_when_k1` (False), `scale` (1.0), `activation`
    ("swiglu"), `swiglu_alpha` / `swiglu_limit`, `shared_gate` (False). The router logits include
    `params['router']['bias']` when present (a learned logit bias). A shared expert is added iff
    `params` has a "shared" entry (gated iff `shared_gate`). `kept` `[T, k]` defaults to all True
    (dropless); capacity drops zero a slot AFTER the renormalisation (docs/algorithms.md: the
    remaining weights are not renormalised). All ids must be real experts (no null / unused slots).
    """
    cfg = {**cfg, **(cfg.get("router") or {})}  # router fields live under "router"
    ids = np.asarray(ids)
    kept = np.ones(ids.shape, bool) if kept is None else np.asarray(kept, bool)
    x_TxD = jnp.asarray(x_TxD)
    logits = x_TxD.astype(jnp.float32) @ params["router"]["kernel"].astype(jnp.float32)
    if "bias" in params["router"]:
        logits = logits + params["router"]["bias"].astype(jnp.float32)
    num_experts = params["experts"]["w_down"].shape[0]
    if ids.min() < 0 or ids.max() >= num_experts:
        raise ValueError(f"ref_moe is for top-k routing: ids must be in [0, {num_experts})")
    weights = ref_weights_jnp(
        logits,
        ids,
        score=cfg.get("score", "softmax"),
        normalize=cfg.get("normalize", False),
        scale=cfg.get("scale", 1.0),
        renorm_when_k1=cfg.get("renorm_when_k1", False),
    )
    shared = None
    if "shared" in params:
        shared = "gated" if cfg.get("shared_gate", False) else "plain"
    return ref_moe_forward(
        params,
        x_TxD,
        ids,
        weights,
        kept,
        cfg.get("activation", "swiglu"),
        shared,
        cfg.get("swiglu_alpha", 1.702),
        cfg.get("swiglu_limit", 7.0),
    )


# ----------------------------------------------------------------------------------------------
# Adaptive routers (docs/algorithms.md expert choice, AdaMoE null experts, dynamic top-p)
# ----------------------------------------------------------------------------------------------


def ref_null_experts(logits, k: int, num_null: int, null_offset: float = 0.0):
    """AdaMoE null-expert routing (docs/algorithms.md), one token at a time.

    The last `num_null` of the `E + M` columns are null experts. Probabilities are the float64
    softmax over all `E + M` columns. Selection: the k best of `logits + null_offset` (offset on
    the null columns only), stable descending order, ties to the lower index. A null pick becomes
    an unused slot (id `E`, weight 0, not valid); the true picks' probabilities are renormalised
    to sum 1 among themselves; a token with no true pick gets all-zero weights.

    Returns:
      ids `[T, k]` int64 (E on null picks), weights `[T, k]` float64, valid `[T, k]` bool,
      probs `[T, E + M]` float64, choices `[T, k]` int64 (the raw picks over E + M, null ids kept).
    """
    z = np.asarray(logits, np.float64)
    t_count, e_all = z.shape
    num_true = e_all - num_null
    probs = ref_scores(z, "softmax")
    sel = z + np.where(np.arange(e_all) >= num_true, float(null_offset), 0.0)
    ids = np.full((t_count, k), num_true, np.int64)
    weights = np.zeros((t_count, k), np.float64)
    valid = np.zeros((t_count, k), bool)
    choices = np.zeros((t_count, k), np.int64)
    for t in range(t_count):
        chosen = _order_desc(sel[t])[:k]
        choices[t] = chosen
        total = sum(probs[t, e] for e in chosen if e < num_true)
        for j, e in enumerate(chosen):
            if e < num_true:
                ids[t, j] = e
                valid[t, j] = True
                weights[t, j] = probs[t, e] / total
    return ids, weights, valid, probs, choices


def ref_top_p(logits, p: float, max_k: int | None = None, boundary: str = "strict"):
    """Dynamic top-p routing (docs/algorithms.md), one token at a time, float64.

    Experts in descending probability (ties to the lower index); t = the first rank whose
    cumulative probability is `> p` ("strict", official) or `>= p` ("inclusive"); ranks 0..t are
    kept (so at least one), and every expert if no rank passes. Weights are the raw probabilities.
    `K = max_k or E` slots: the kept experts first (descending), then unused slots (id E, weight 0).

    Returns:
      ids `[T, K]` int64, weights `[T, K]` float64, valid `[T, K]` bool, probs `[T, E]` float64.
    """
    probs = ref_scores(logits, "softmax")
    t_count, e_count = probs.shape
    k_slots = e_count if max_k is None else max_k
    ids = np.full((t_count, k_slots), e_count, np.int64)
    weights = np.zeros((t_count, k_slots), np.float64)
    valid = np.zeros((t_count, k_slots), bool)
    for t in range(t_count):
        order = _order_desc(probs[t])
        last = e_count - 1
        cum = 0.0
        for rank, e in enumerate(order):
            cum += probs[t, e]
            passed = cum > p if boundary == "strict" else cum >= p
            if passed:
                last = rank
                break
        for rank in range(min(last + 1, k_slots)):
            e = order[rank]
            ids[t, rank] = e
            weights[t, rank] = probs[t, e]
            valid[t, rank] = True
    return ids, weights, valid, probs


def ref_expert_choice(logits, capacity: int):
    """Expert-choice routing (docs/algorithms.md), one expert at a time, float64.

    Each expert takes the `capacity` tokens with the highest softmax probability in its column
    (ties to the lower token index). Layout: `K = E` slots, slot e is expert e:
    `ids[t, e] = e` if e chose t else E; `weights[t, e] = probs[t, e]` if chosen else 0.

    Returns:
      ids `[T, E]` int64, weights `[T, E]` float64, valid `[T, E]` bool, probs `[T, E]` float64.
    """
    probs = ref_scores(logits, "softmax")
    t_count, e_count = probs.shape
    ids = np.full((t_count, e_count), e_count, np.int64)
    weights = np.zeros((t_count, e_count), np.float64)
    valid = np.zeros((t_count, e_count), bool)
    for e in range(e_count):
        for t in _order_desc(probs[:, e])[:capacity]:
            ids[t, e] = e
            weights[t, e] = probs[t, e]
            valid[t, e] = True
    return ids, weights, valid, probs


def ref_masked_weights_jnp(logits, ids, valid, normalize: bool):
    """Differentiable (jnp) weights `[T, K]` of FIXED ids / valid mask: softmax probs of the valid
    slots' experts (0 elsewhere), renormalised over the valid slots if `normalize` (a row with no
    valid slot stays all zero)."""
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
    ids = np.asarray(ids)
    valid = np.asarray(valid, bool)
    safe_ids = np.where(valid, ids, 0)  # any real column; masked out below
    w = jnp.where(valid, probs[np.arange(ids.shape[0])[:, None], safe_ids], 0.0)
    if normalize:
        has_valid = valid.any(-1, keepdims=True)
        w = w / jnp.where(has_valid, jnp.sum(w, -1, keepdims=True), 1.0)
    return w


def ref_load_balance_null(
    ids_all,
    probs_all,
    num_true: int,
    num_null: int,
    normalization: str,
    null_balance: str,
    token_mask=None,
):
    """AdaMoE load balance over all `E + M` experts (docs/algorithms.md).

    `ids_all` `[T, k]` are the raw top-k picks over E + M (null ids `E..E+M-1` included).
    counts_i = picks of expert i over unmasked tokens (slot 0 only for "switch_top1");
    "grouped": every null count replaced by the mean null count; "individual": kept as is.
    f = counts / T ("switch_top1", "per_assignment") or counts / (k T) ("per_assignment_over_k"),
    P_i = mean over unmasked tokens of the row-normalised probs; loss = (E + M) * sum_i f_i P_i.
    `probs_all` may be a jax array, and then the result is differentiable in it.
    """
    ids_all = np.asarray(ids_all)
    t_count, k = ids_all.shape
    e_all = num_true + num_null
    mask = _mask(t_count, token_mask)
    n = max(int(mask.sum()), 1)
    slots = 1 if normalization == "switch_top1" else k
    counts = np.zeros(e_all)
    for t in range(t_count):
        if mask[t]:
            for j in range(slots):
                counts[ids_all[t, j]] += 1
    if null_balance == "grouped":
        if num_null:
            counts[num_true:] = counts[num_true:].mean()
    elif null_balance != "individual":
        raise ValueError(null_balance)
    return _balance_from_counts(counts, probs_all, mask, n, k, normalization)
