"""Tests of `jmoe.dispatch` against plain per-token / per-slot loops in NumPy.

References are built slot by slot from the routing alone (never from a jmoe plan), so the sorted
order, group sizes, capacity queue and the full MoE are all checked independently.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases

from jmoe import kernels
from jmoe.moe import dispatch
from jmoe.moe.routing import Routing, top_k

CASES = {c.name: c for c in shape_cases.ROUTING_CASES}


# ------------------------------------------------------------------------------ routings


def _routing(ids, weights, valid, num_experts):
    ids, weights, valid = np.asarray(ids), np.asarray(weights), np.asarray(valid)
    t = ids.shape[0]
    return Routing(
        expert_ids=jnp.asarray(ids, jnp.int32),
        weights=jnp.asarray(weights, jnp.float32),
        valid=jnp.asarray(valid, bool),
        probs=jnp.full((t, num_experts), 1.0 / num_experts, jnp.float32),
        logits=jnp.zeros((t, num_experts), jnp.float32),
    )


def _with_invalid(ids, weights, invalid, num_experts):
    """Marks `invalid` slots unused the way the contract says: id = E, weight 0, not valid."""
    ids = np.where(invalid, num_experts, ids)
    weights = np.where(invalid, 0.0, weights)
    return _routing(ids, weights, ~invalid, num_experts)


def hand_routings():
    """Hand-made routings with unused slots; (routing, num_experts)."""
    rng = np.random.default_rng(0)
    out = {}
    t, k, e = 11, 3, 5
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    w = rng.uniform(0.1, 1.0, (t, k))
    invalid = rng.random((t, k)) < 0.35
    invalid[3] = True  # a token with no valid slot at all
    out["random_invalid"] = (_with_invalid(ids, w, invalid, e), e)
    # Every slot unused.
    out["all_invalid"] = (_with_invalid(ids, w, np.ones((t, k), bool), e), e)
    # Only the last expert used, and only the second slot.
    ids2 = np.full((6, 2), e - 1)
    inv2 = np.zeros((6, 2), bool)
    inv2[:, 0] = True
    out["last_expert_second_slot"] = (_with_invalid(ids2, rng.uniform(size=(6, 2)), inv2, e), e)
    # A token repeating an expert in two slots (stability must follow slot order t * K + k).
    ids3 = np.array([[1, 1], [0, 1], [1, 0], [2, 2]])
    inv3 = np.array([[False, False], [False, True], [False, False], [True, False]])
    out["repeated_expert"] = (_with_invalid(ids3, rng.uniform(size=(4, 2)), inv3, 3), 3)
    return out


HAND = hand_routings()


def case_routing(name):
    c = CASES[name]
    return top_k(jnp.asarray(c.logits(seed=1)), c.k), c.num_experts


def all_routings():
    out = {f"catalogue:{n}": (lambda n=n: case_routing(n)) for n in CASES}
    out.update({f"hand:{n}": (lambda n=n: HAND[n]) for n in HAND})
    return out


ROUTINGS = all_routings()


# ------------------------------------------------------------------------------ NumPy references


def ref_sort(routing, num_experts):
    """Slots sorted by expert (ascending), token/slot order within an expert; counts; unused."""
    ids = np.asarray(routing.expert_ids)
    valid = np.asarray(routing.valid)
    t, k = ids.shape
    slots, counts = [], np.zeros(num_experts, np.int64)
    for e in range(num_experts):
        for tt in range(t):
            for kk in range(k):
                if valid[tt, kk] and ids[tt, kk] == e:
                    slots.append(tt * k + kk)
                    counts[e] += 1
    unused = [tt * k + kk for tt in range(t) for kk in range(k) if not valid[tt, kk]]
    return np.array(slots, np.int64), counts, np.array(unused, np.int64)


def ref_combine(y, slots, routing):
    """out[t] = sum over valid slots (t, k) of w[t, k] * y[row of (t, k)], row from `slots`."""
    w = np.asarray(routing.weights, np.float64)
    t, k = w.shape
    out = np.zeros((t, y.shape[1]))
    for row, slot in enumerate(slots):
        out[slot // k] += w[slot // k, slot % k] * np.asarray(y[row], np.float64)
    return out


def ref_capacity(routing, num_experts, capacity):
    """GShard / Switch queue: first choices of all tokens (token order), then second choices..."""
    ids = np.asarray(routing.expert_ids)
    valid = np.asarray(routing.valid)
    w = np.asarray(routing.weights)
    t, k = ids.shape
    queued = np.zeros(num_experts, np.int64)
    keep = np.zeros((t, k), bool)
    for kk in range(k):
        for tt in range(t):
            if valid[tt, kk]:
                e = ids[tt, kk]
                keep[tt, kk] = queued[e] < capacity
                queued[e] += 1
    n_valid = valid.sum()
    frac = (n_valid - keep.sum()) / max(n_valid, 1)
    return np.where(keep, ids, num_experts), np.where(keep, w, 0.0), keep, frac


# ------------------------------------------------------------------------------ sort_by_key


KEY_CASES = {
    "random": np.random.default_rng(3).integers(0, 6, 40),  # keys 0..5, 5 = the unused bucket
    "one_key": np.full(9, 2),
    "all_in_bucket": np.full(7, 5),
    "sorted_desc": np.arange(5, -1, -1),
    "empty": np.zeros(0, np.int64),
}


@pytest.mark.parametrize("name", list(KEY_CASES))
def test_sort_by_key_matches_a_loop(name):
    keys = KEY_CASES[name]
    num_keys = 5
    sort = dispatch.sort_by_key(jnp.asarray(keys, jnp.int32), num_keys)
    order = [i for key in range(num_keys + 1) for i in range(len(keys)) if keys[i] == key]
    rank = [int(np.sum(keys[:i] == keys[i])) for i in range(len(keys))]  # equal keys before i
    np.testing.assert_array_equal(sort.order, order)
    np.testing.assert_array_equal(sort.inverse, np.argsort(order))
    np.testing.assert_array_equal(sort.rank, rank)
    np.testing.assert_array_equal(sort.counts, np.bincount(keys, minlength=num_keys + 1))
    assert all(a.dtype == jnp.int32 for a in sort)


@pytest.mark.parametrize("name", list(HAND))
def test_slot_expert_ids_buckets_unused_slots(name):
    routing, e = HAND[name]
    ids = np.where(np.asarray(routing.valid), np.asarray(routing.expert_ids), e)
    out = dispatch.slot_expert_ids(routing, e)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, ids)
    # the bucket holds exactly the unused slots, even where an unused slot kept a real id
    stale = dataclasses.replace(routing, expert_ids=jnp.zeros_like(routing.expert_ids))
    np.testing.assert_array_equal(
        dispatch.slot_expert_ids(stale, e), np.where(np.asarray(routing.valid), 0, e)
    )


# ------------------------------------------------------------------------------ make_plan / permute


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_make_plan_sorts_by_expert_stably(name):
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    m = t * k
    plan = dispatch.make_plan(routing, e)
    slots, counts, unused = ref_sort(routing, e)
    used = len(slots)
    order = np.asarray(plan.sort_order)
    inv = np.asarray(plan.slot_to_row)
    assert order.shape == (m,) and inv.shape == (m,)
    assert plan.group_sizes.shape == (e,)
    np.testing.assert_array_equal(np.asarray(plan.group_sizes), counts)
    np.testing.assert_array_equal(order[:used], slots)
    np.testing.assert_array_equal(np.sort(order[used:]), unused)  # unused after the groups
    np.testing.assert_array_equal(np.sort(order), np.arange(m))  # a permutation
    np.testing.assert_array_equal(inv[order], np.arange(m))  # slot_to_row is its inverse


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_permute_and_identity_combine(name):
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    d = 5
    x = np.random.default_rng(1).normal(size=(t, d)).astype(np.float32)
    plan = dispatch.make_plan(routing, e)
    slots, _, _ = ref_sort(routing, e)
    xs = np.asarray(dispatch.permute(jnp.asarray(x), plan))
    assert xs.shape == (t * k, d)
    np.testing.assert_array_equal(xs[: len(slots)], x[slots // k])
    # Identity expert: combine(permute(x)) = sum_k w[t, k] x[t] over valid slots.
    out = np.asarray(dispatch.combine(jnp.asarray(xs), plan, routing.weights))
    w = np.asarray(routing.weights, np.float64)
    valid = np.asarray(routing.valid)
    expected = np.zeros((t, d))
    for tt in range(t):
        for kk in range(k):
            if valid[tt, kk]:
                expected[tt] += w[tt, kk] * x[tt]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_combine_matches_slot_loop(name):
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    y = np.random.default_rng(2).normal(size=(t * k, 3)).astype(np.float32)
    plan = dispatch.make_plan(routing, e)
    slots, _, _ = ref_sort(routing, e)
    out = dispatch.combine(jnp.asarray(y), plan, routing.weights)
    assert out.shape == (t, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), ref_combine(y, slots, routing), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_permute_combine_gradients_vs_dense_reference(name):
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    d = 4
    rng = np.random.default_rng(3)
    x, y, ct_x, ct_y = (
        rng.normal(size=s).astype(np.float32) for s in ((t, d), (t * k, d), (t * k, d), (t, d))
    )
    w = np.asarray(routing.weights)
    valid = np.asarray(routing.valid)
    slots, _, _ = ref_sort(routing, e)
    used = len(slots)
    plan = dispatch.make_plan(routing, e)

    def loss(x, y, w):
        xs = dispatch.permute(x, plan)
        return jnp.sum(xs[:used] * ct_x[:used]) + jnp.sum(dispatch.combine(y, plan, w) * ct_y)

    # Dense reference from the NumPy sort: gather rows, one-hot scatter matrix for combine.
    row_of_slot = np.zeros(t * k, np.int64)
    row_of_slot[slots] = np.arange(used)
    hand_gy = np.zeros((t * k, d))  # d/dy[row of (t, k)] = w[t, k] * ct_y[t], valid slots
    for tt in range(t):
        for kk in range(k):
            if valid[tt, kk]:
                hand_gy[row_of_slot[tt * k + kk]] = w[tt, kk] * ct_y[tt]

    def ref_loss(x, y, w):
        xs = jnp.take(x, jnp.asarray(slots // k, jnp.int32), axis=0)
        y_slots = jnp.take(y, jnp.asarray(row_of_slot, jnp.int32), axis=0).reshape(t, k, d)
        y_slots = jnp.where(jnp.asarray(valid)[:, :, None], y_slots, 0.0)
        out = jnp.einsum("tkd,tk->td", y_slots, w)
        return jnp.sum(xs * ct_x[:used]) + jnp.sum(out * ct_y)

    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    gx, gy, gw = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    rx, ry, rw = jax.grad(ref_loss, argnums=(0, 1, 2))(*args)
    # By hand too: d/dx[t] = sum of ct_x over t's valid slot rows; d/dy[row] = w * ct_y[token].
    hand_gx = np.zeros((t, d))
    for row, slot in enumerate(slots):
        hand_gx[slot // k] += ct_x[row]
    np.testing.assert_allclose(np.asarray(gx), hand_gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gy)[:used], np.asarray(ry)[:used], rtol=1e-5, atol=1e-5)
    # Rows of unused slots carry weight 0, so they get no gradient.
    np.testing.assert_allclose(np.asarray(gy)[used:], 0.0, atol=0)
    np.testing.assert_allclose(np.asarray(gw)[valid], np.asarray(rw)[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gy), hand_gy, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(gw)).all()


# ------------------------------------------------------------------------------ apply_capacity


def _capacities(routing, e):
    t, k = routing.expert_ids.shape
    return sorted({0, 1, 2, math.ceil(t * k / e), t * k})


def _check_capacity(routing, e, cap):
    kept, frac = dispatch.apply_capacity(routing, e, cap)
    ids, w, keep, rfrac = ref_capacity(routing, e, cap)
    np.testing.assert_array_equal(np.asarray(kept.valid), keep)
    np.testing.assert_array_equal(np.asarray(kept.expert_ids), ids)
    np.testing.assert_array_equal(np.asarray(kept.weights), w)  # kept weights not renormalised
    assert kept.expert_ids.dtype == jnp.int32 and kept.weights.dtype == jnp.float32
    assert frac.dtype == jnp.float32 and frac.shape == ()
    np.testing.assert_allclose(float(frac), rfrac, rtol=1e-6, atol=0)
    # Independent count: total drops = sum_e max(0, n_e - capacity).
    valid = np.asarray(routing.valid)
    n_e = np.bincount(np.asarray(routing.expert_ids)[valid], minlength=e)
    assert valid.sum() - keep.sum() == np.maximum(n_e - cap, 0).sum()
    # No expert exceeds its capacity; probs and logits pass through.
    assert np.all(np.bincount(np.asarray(kept.expert_ids)[keep], minlength=e) <= cap)
    np.testing.assert_array_equal(np.asarray(kept.probs), np.asarray(routing.probs))
    np.testing.assert_array_equal(np.asarray(kept.logits), np.asarray(routing.logits))
    return kept, frac


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_apply_capacity_matches_queue(name):
    routing, e = ROUTINGS[name]()
    for cap in _capacities(routing, e):
        _check_capacity(routing, e, cap)


def test_apply_capacity_first_choices_before_second_choices():
    """Expert 0 is token 0's second choice and every later token's first choice: with capacity
    2 the first choices of tokens 1 and 2 win over token 0's earlier-in-token-order slot."""
    ids = np.array([[1, 0], [0, 2], [0, 1], [0, 2]])
    routing = _routing(ids, np.full((4, 2), 0.5), np.ones((4, 2), bool), 3)
    kept, frac = dispatch.apply_capacity(routing, 3, 2)
    expected_valid = [[True, False], [True, True], [True, True], [False, True]]
    np.testing.assert_array_equal(np.asarray(kept.valid), expected_valid)
    np.testing.assert_array_equal(np.asarray(kept.expert_ids), [[1, 3], [0, 2], [0, 1], [3, 2]])
    np.testing.assert_array_equal(
        np.asarray(kept.weights), [[0.5, 0], [0.5, 0.5], [0.5, 0.5], [0, 0.5]]
    )
    assert float(frac) == 2 / 8


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_capacity_zero_drops_everything(name):
    routing, e = ROUTINGS[name]()
    kept, frac = dispatch.apply_capacity(routing, e, 0)
    assert not np.asarray(kept.valid).any()
    np.testing.assert_array_equal(np.asarray(kept.expert_ids), e)
    np.testing.assert_array_equal(np.asarray(kept.weights), 0.0)
    assert float(frac) == (1.0 if np.asarray(routing.valid).any() else 0.0)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_large_capacity_is_identity(name):
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    kept, frac = dispatch.apply_capacity(routing, e, t * k)
    for f in dataclasses.fields(Routing):
        np.testing.assert_array_equal(
            np.asarray(getattr(kept, f.name)), np.asarray(getattr(routing, f.name)), err_msg=f.name
        )
    assert float(frac) == 0.0


@pytest.mark.parametrize("cap", [0, 1, 5, 9, 24])
def test_skewed_k2_drops_exactly_the_overflow(cap):
    """All tokens' first choice is expert 0 (k = 2): expert 0 keeps its first `cap` tokens in
    token order, the second choices are kept up to their own capacity."""
    c = CASES["all_to_one_expert"]
    logits = c.logits(seed=4)
    routing = top_k(jnp.asarray(logits), 2)
    ids = np.asarray(routing.expert_ids)
    t, e = c.num_tokens, c.num_experts
    assert (ids[:, 0] == 0).all() and (ids[:, 1] != 0).all()
    kept, frac = _check_capacity(routing, e, cap)
    valid = np.asarray(kept.valid)
    np.testing.assert_array_equal(valid[:, 0], np.arange(t) < cap)
    second = np.bincount(ids[:, 1], minlength=e)
    overflow = max(t - cap, 0) + np.maximum(second - cap, 0).sum()
    assert math.isclose(float(frac), overflow / (2 * t), rel_tol=1e-6)
    for ex in range(1, e):  # each second-choice expert keeps its earliest `cap` tokens
        toks = np.flatnonzero(ids[:, 1] == ex)
        np.testing.assert_array_equal(valid[toks, 1], np.arange(len(toks)) < cap)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_make_plan_max_rows_after_capacity(name):
    """With capacity C at most E * C slots survive, so a plan of `R = E * C` rows is enough:
    permute gives `[R, D]` rows sorted as before, combine and its gradients are unchanged."""
    routing, e = ROUTINGS[name]()
    t, k = routing.expert_ids.shape
    d = 3
    rng = np.random.default_rng(7)
    x, ct = rng.normal(size=(t, d)).astype(np.float32), rng.normal(size=(t, d)).astype(np.float32)
    for cap in _capacities(routing, e)[1:]:  # capacity 0: test_make_plan_zero_rows
        kept, _ = dispatch.apply_capacity(routing, e, cap)
        rows = min(t * k, e * cap)
        plan = dispatch.make_plan(kept, e, max_rows=e * cap)
        slots, counts, _ = ref_sort(kept, e)
        used = len(slots)
        order, inv = np.asarray(plan.sort_order), np.asarray(plan.slot_to_row)
        assert order.shape == (rows,) and inv.shape == (t * k,)
        np.testing.assert_array_equal(np.asarray(plan.group_sizes), counts)
        np.testing.assert_array_equal(order[:used], slots)
        np.testing.assert_array_equal(inv[order], np.arange(rows))
        xs = np.asarray(dispatch.permute(jnp.asarray(x), plan))
        assert xs.shape == (rows, d)
        np.testing.assert_array_equal(xs[:used], x[slots // k])

        def loss(x, w, plan=plan):
            return jnp.sum(dispatch.combine(dispatch.permute(x, plan), plan, w) * ct)

        val, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(x), kept.weights)
        w = np.asarray(kept.weights, np.float64)
        wsum = (w * np.asarray(kept.valid)).sum(1)
        np.testing.assert_allclose(float(val), np.sum(wsum[:, None] * x * ct), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gx), wsum[:, None] * ct, rtol=1e-5, atol=1e-5)
        valid = np.asarray(kept.valid)
        hand_gw = np.broadcast_to((x * ct).sum(1, keepdims=True), (t, k))
        np.testing.assert_allclose(np.asarray(gw)[valid], hand_gw[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_make_plan_zero_rows(impl):
    """Capacity 0 keeps no slot, so `max_rows = E * 0` rows suffice and the layer outputs 0."""
    routing, e = case_routing("aligned")
    t = routing.expert_ids.shape[0]
    kept, frac = dispatch.apply_capacity(routing, e, 0)
    plan = dispatch.make_plan(kept, e, max_rows=0)
    x = jnp.ones((t, 4))
    xs = dispatch.permute(x, plan)
    assert xs.shape == (0, 4)
    w = jnp.ones((e, 4, 4))
    ys = kernels.expert_mlp(xs, (w,), w, plan.group_sizes, activation="relu", implementation=impl)
    out = dispatch.combine(ys, plan, kept.weights)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((t, 4)))


# ------------------------------------------------------------------------------ full pipeline

T, D, F, E, K = 16, 8, 12, 4, 2


def _silu(v):
    return v / (1.0 + np.exp(-v))


def ref_moe(x, routing, w_gate, w_up, w_down):
    """Per-token loop MoE in float64: out[t] = sum_k valid w[t, k] * SwiGLU_{e}(x[t])."""
    ids = np.asarray(routing.expert_ids)
    w = np.asarray(routing.weights, np.float64)
    valid = np.asarray(routing.valid)
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if valid[t, k]:
                e = ids[t, k]
                h = _silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])
                out[t] += w[t, k] * (h @ w_down[e])
    return out


@pytest.fixture(scope="module")
def moe_inputs():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(T, D)).astype(np.float32)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    w_gate = (rng.normal(size=(E, D, F)) / math.sqrt(D)).astype(np.float32)
    w_up = (rng.normal(size=(E, D, F)) / math.sqrt(D)).astype(np.float32)
    w_down = (rng.normal(size=(E, F, D)) / math.sqrt(F)).astype(np.float32)
    return tuple(map(jnp.asarray, (x, logits, w_gate, w_up, w_down)))


def _pipeline(implementation, capacity=None, max_rows=None):
    @jax.jit
    def run(x, routing, w_gate, w_up, w_down):
        frac = jnp.float32(0)
        if capacity is not None:
            routing, frac = dispatch.apply_capacity(routing, E, capacity)
        plan = dispatch.make_plan(routing, E, max_rows)
        ys = kernels.expert_mlp(
            dispatch.permute(x, plan),
            (w_gate, w_up),
            w_down,
            plan.group_sizes,
            activation="swiglu",
            implementation=implementation,
        )
        return dispatch.combine(ys, plan, routing.weights), frac

    return run


def _null_routing(routing):
    """The top-k routing with a few slots made unused (null picks)."""
    invalid = np.zeros((T, K), bool)
    invalid[[1, 4, 5, 11], [1, 0, 1, 0]] = True
    invalid[7] = True
    return _with_invalid(np.asarray(routing.expert_ids), np.asarray(routing.weights), invalid, E)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
@pytest.mark.parametrize("with_null", [False, True])
def test_pipeline_matches_per_token_moe(moe_inputs, impl, with_null):
    x, logits, w_gate, w_up, w_down = moe_inputs
    routing = top_k(logits, K)
    if with_null:
        routing = _null_routing(routing)
    expected = ref_moe(x, routing, w_gate, w_up, w_down)
    dropless, _ = _pipeline(impl)(x, routing, w_gate, w_up, w_down)
    assert dropless.shape == (T, D) and dropless.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dropless), expected, rtol=1e-5, atol=1e-5)
    # Capacity large enough to drop nothing gives identical outputs.
    capped, frac = _pipeline(impl, capacity=T * K)(x, routing, w_gate, w_up, w_down)
    assert float(frac) == 0.0
    np.testing.assert_array_equal(np.asarray(capped), np.asarray(dropless))
    # Exactly enough capacity for the busiest expert: still nothing dropped.
    n_e = np.bincount(np.asarray(routing.expert_ids)[np.asarray(routing.valid)], minlength=E)
    capped, frac = _pipeline(impl, capacity=int(n_e.max()))(x, routing, w_gate, w_up, w_down)
    assert float(frac) == 0.0
    np.testing.assert_array_equal(np.asarray(capped), np.asarray(dropless))


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_pipeline_with_drops_matches_per_token_moe(moe_inputs, impl):
    x, logits, w_gate, w_up, w_down = moe_inputs
    routing = top_k(logits, K)
    cap = 5  # T * K / E = 8 rows per expert on average: some experts overflow
    ids, w, keep, rfrac = ref_capacity(routing, E, cap)
    assert 0 < rfrac < 1
    ref_routing = _routing(ids, w, keep, E)
    expected = ref_moe(x, ref_routing, w_gate, w_up, w_down)
    for max_rows in (None, E * cap):  # all T * K rows, or only the E * C that can be kept
        run = _pipeline(impl, capacity=cap, max_rows=max_rows)
        out, frac = run(x, routing, w_gate, w_up, w_down)
        np.testing.assert_allclose(float(frac), rfrac, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_pipeline_gradients_vs_dense_moe(moe_inputs, impl):
    """Gradients w.r.t. x, the routing weights and the expert weights match a dense jnp MoE that
    runs every expert on every token and masks with the routing."""
    x, logits, w_gate, w_up, w_down = moe_inputs
    routing = _null_routing(top_k(logits, K))
    ct = jnp.asarray(np.random.default_rng(6).normal(size=(T, D)).astype(np.float32))
    ids, valid = routing.expert_ids, routing.valid
    plan = dispatch.make_plan(routing, E)

    def loss(x, weights, w_gate, w_up, w_down):
        ys = kernels.expert_mlp(
            dispatch.permute(x, plan),
            (w_gate, w_up),
            w_down,
            plan.group_sizes,
            activation="swiglu",
            implementation=impl,
        )
        return jnp.sum(dispatch.combine(ys, plan, weights) * ct)

    def dense_loss(x, weights, w_gate, w_up, w_down):
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
        y_TxExD = jnp.einsum("tef,efd->ted", h, w_down)
        mask_TxKxE = (ids[:, :, None] == jnp.arange(E)) & valid[:, :, None]
        gate_TxE = jnp.einsum("tke,tk->te", mask_TxKxE.astype(jnp.float32), weights)
        return jnp.sum(jnp.einsum("ted,te->td", y_TxExD, gate_TxE) * ct)

    args = (x, routing.weights, w_gate, w_up, w_down)
    got = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)
    want = jax.grad(dense_loss, argnums=tuple(range(5)))(*args)
    names = ("x", "weights", "w_gate", "w_up", "w_down")
    for name, g, r in zip(names, got, want, strict=True):
        g, r = np.asarray(g), np.asarray(r)
        if name == "weights":  # the gradient of an unused slot's weight is not specified
            g, r = g[np.asarray(valid)], r[np.asarray(valid)]
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=name)
