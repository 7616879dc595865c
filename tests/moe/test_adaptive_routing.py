"""Adaptive routers (null experts, top-p, expert choice) and their losses vs tests/moe_reference.py.

The oracles (`ref_null_experts`, `ref_top_p`, `ref_expert_choice`, `ref_load_balance_null`,
`ref_masked_weights_jnp`, `ref_entropy`) are written from docs/algorithms.md and never
import jmoe.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from jmoe.moe import losses, routing

RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
NORMALIZATIONS = ("switch_top1", "per_assignment", "per_assignment_over_k")


def _logits(seed, t, e, scale=1.5):
    return (np.random.default_rng(seed).normal(size=(t, e)) * scale).astype(np.float32)


def _check(r, ids, weights, valid, probs, logits, num_experts):
    """A jmoe Routing equals a reference (ids, weights, valid, probs) and keeps the contract."""
    t, k = ids.shape
    assert isinstance(r, routing.Routing)
    assert r.expert_ids.shape == (t, k) and r.expert_ids.dtype == jnp.int32
    assert r.weights.shape == (t, k) and r.weights.dtype == jnp.float32
    assert r.valid.shape == (t, k) and r.valid.dtype == jnp.bool_
    assert r.probs.shape == probs.shape and r.probs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(r.valid), valid)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(r.weights), weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(r.probs), probs, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(r.logits), np.asarray(logits, np.float32))
    # Contract: unused slots hold id E and weight exactly 0.
    invalid = ~np.asarray(r.valid)
    assert (np.asarray(r.expert_ids)[invalid] == num_experts).all()
    assert (np.asarray(r.weights)[invalid] == 0.0).all()
    assert np.isfinite(np.asarray(r.weights)).all()


_null_jit = jax.jit(routing.null_experts, static_argnums=1, static_argnames=("num_null",))
_top_p_jit = jax.jit(routing.top_p, static_argnames=("max_k", "boundary"))
_expert_choice_jit = jax.jit(routing.expert_choice, static_argnums=1)


def _weights_grad(fn, logits, seed=0):
    """Gradient of sum(weights * ct) w.r.t. the logits, with a fixed random cotangent."""
    r0 = fn(jnp.asarray(logits))
    ct = jnp.asarray(np.random.default_rng(seed + 100).normal(size=r0.weights.shape), jnp.float32)
    grad_fn = jax.jit(jax.grad(lambda z, c: jnp.sum(fn(z).weights * c)))
    return grad_fn(jnp.asarray(logits), ct), ct


# =================================================================================== null experts

NULL_SHAPES = [(0, 24, 4, 1), (1, 32, 6, 3), (2, 40, 8, 4)]


@pytest.mark.parametrize("seed,t,e,m", NULL_SHAPES)
def test_null_experts_matches_reference_for_every_k(seed, t, e, m):
    logits = _logits(seed, t, e + m)
    n_true_seen = set()
    for k in range(1, e + m + 1):
        r = _null_jit(jnp.asarray(logits), k, num_null=m)
        ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, m)
        _check(r, ids, w, valid, probs, logits, e)
        # Per token: weights of the true picks sum to 1, or all 0 for an all-null token.
        sums = np.asarray(r.weights).sum(-1)
        has_true = valid.any(-1)
        np.testing.assert_allclose(sums[has_true], 1.0, rtol=1e-5)
        assert (sums[~has_true] == 0.0).all()
        n_true_seen.update(valid.sum(-1).tolist())
    # The random logits do exercise variable numbers of true experts, including 0 (all null).
    assert 0 in n_true_seen and len(n_true_seen) >= 3


@pytest.mark.parametrize("offset", [0.8, -0.6, 2.5])
def test_null_experts_offset_matches_reference(offset):
    e, m = 6, 3
    logits = _logits(5, 32, e + m)
    for k in (1, 3, 5):
        r = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=offset)
        ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, m, null_offset=offset)
        _check(r, ids, w, valid, probs, logits, e)


def test_null_experts_offset_changes_selection_not_probs():
    e, m, k = 6, 3, 3
    logits = _logits(6, 32, e + m)
    lo = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=-1.0)
    hi = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=1.0)
    assert int(hi.valid.sum()) < int(lo.valid.sum())  # larger offset -> more null picks
    np.testing.assert_array_equal(np.asarray(lo.probs), np.asarray(hi.probs))


def test_null_experts_traced_offset_under_jit():
    e, m, k = 5, 2, 3
    logits = _logits(7, 24, e + m)
    fn = jax.jit(lambda z, o: routing.null_experts(z, k, num_null=m, null_offset=o))
    for offset in (-0.7, 0.0, 1.3):
        r = fn(jnp.asarray(logits), jnp.float32(offset))
        ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, m, null_offset=offset)
        _check(r, ids, w, valid, probs, logits, e)
    # The offset only moves the selection: no gradient reaches it through the weights.
    g = jax.grad(lambda o: jnp.sum(fn(jnp.asarray(logits), o).weights ** 2))(jnp.float32(0.3))
    assert float(g) == 0.0


def test_null_experts_known_answers():
    """docs/algorithms.md: N=2, M=2, k=2."""
    r = routing.null_experts(jnp.log(jnp.array([[0.4, 0.1, 0.3, 0.2]])), 2, num_null=2)
    assert r.expert_ids.tolist() == [[0, 2]]  # picks {t0, n0}; n0 -> unused slot id E=2
    assert r.valid.tolist() == [[True, False]]
    np.testing.assert_allclose(np.asarray(r.weights), [[1.0, 0.0]], rtol=RTOL, atol=ATOL)
    r = routing.null_experts(jnp.log(jnp.array([[0.1, 0.1, 0.4, 0.4]])), 2, num_null=2)
    assert r.expert_ids.tolist() == [[2, 2]] and r.valid.tolist() == [[False, False]]
    assert np.asarray(r.weights).tolist() == [[0.0, 0.0]]


def test_null_experts_all_null_tokens_are_exact_zeros_without_nan():
    e, m, k = 4, 3, 2
    logits = _logits(8, 20, e + m)
    logits[::2, e:] += 30.0  # even tokens: every pick is null
    r = _null_jit(jnp.asarray(logits), k, num_null=m)
    ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, m)
    _check(r, ids, w, valid, probs, logits, e)
    assert not np.asarray(r.valid)[::2].any()
    assert (np.asarray(r.weights)[::2] == 0.0).all()
    assert np.asarray(r.valid)[1::2].any()  # the odd tokens still use true experts
    grad, _ = _weights_grad(lambda z: routing.null_experts(z, k, num_null=m), logits)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()
    assert (grad[::2] == 0.0).all()  # weights are the constant 0 there
    assert np.abs(grad[1::2]).sum() > 0


def test_null_experts_k1_weight_is_one_or_zero():
    e, m = 6, 2
    logits = _logits(9, 40, e + m)
    r = _null_jit(jnp.asarray(logits), 1, num_null=m)
    ids, w, valid, probs, _ = ref.ref_null_experts(logits, 1, m)
    _check(r, ids, w, valid, probs, logits, e)
    assert valid.any() and (~valid).any()
    np.testing.assert_array_equal(np.asarray(r.weights), valid.astype(np.float32))


def test_null_experts_k_all_uses_every_true_expert():
    e, m = 5, 3
    logits = _logits(10, 24, e + m)
    r = _null_jit(jnp.asarray(logits), e + m, num_null=m)
    assert (np.asarray(r.valid).sum(-1) == e).all()
    probs = ref.ref_scores(logits, "softmax")
    expected = probs[:, :e] / probs[:, :e].sum(-1, keepdims=True)
    got = np.zeros((24, e + 1))
    np.put_along_axis(got, np.asarray(r.expert_ids), np.asarray(r.weights), axis=-1)
    np.testing.assert_allclose(got[:, :e], expected, rtol=RTOL, atol=ATOL)


def test_null_experts_ties_go_to_lower_index():
    e, m = 4, 3
    logits = np.zeros((6, e + m), np.float32)
    for k in (1, 3, 4, 6, 7):
        r = _null_jit(jnp.asarray(logits), k, num_null=m)
        n_true = min(k, e)
        exp_ids = [list(range(n_true)) + [e] * (k - n_true)] * 6
        assert r.expert_ids.tolist() == exp_ids
        exp_w = np.array([[1.0 / n_true] * n_true + [0.0] * (k - n_true)] * 6)
        np.testing.assert_allclose(np.asarray(r.weights), exp_w, rtol=RTOL, atol=ATOL)


def test_null_experts_extreme_offsets():
    e, m = 5, 3
    logits = _logits(11, 24, e + m)
    for k in (1, 2, 3):  # k <= M: a large positive offset makes every pick null
        r = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=1e4)
        assert not np.asarray(r.valid).any()
        assert (np.asarray(r.weights) == 0.0).all() and (np.asarray(r.expert_ids) == e).all()
    r = _null_jit(jnp.asarray(logits), 5, num_null=m, null_offset=1e4)
    assert (np.asarray(r.valid).sum(-1) == 2).all()  # M nulls first, then the 2 best true
    for k in (1, 3, 5):  # k <= E: a large negative offset means no null pick at all
        r = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=-1e4)
        assert np.asarray(r.valid).all()
        ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, m, null_offset=-1e4)
        _check(r, ids, w, valid, probs, logits, e)
        np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 1.0, rtol=1e-5)


def test_null_experts_zero_null_is_renormalised_top_k():
    e = 6
    logits = _logits(12, 20, e)
    for k in (1, 2, 6):
        r = _null_jit(jnp.asarray(logits), k, num_null=0)
        ids, w, valid, probs, _ = ref.ref_null_experts(logits, k, 0)
        assert valid.all()
        _check(r, ids, w, valid, probs, logits, e)


@pytest.mark.parametrize("k", [3, 7])
def test_null_experts_gradient_matches_fixed_ids_reimplementation(k):
    e, m = 4, 3
    logits = _logits(13, 20, e + m)
    fn = lambda z: routing.null_experts(z, k, num_null=m)  # noqa: E731
    grad, ct = _weights_grad(fn, logits, seed=k)
    ids, _, valid, _, _ = ref.ref_null_experts(logits, k, m)
    g_ref = jax.grad(
        lambda z: jnp.sum(ref.ref_masked_weights_jnp(z, ids, valid, normalize=True) * ct)
    )(jnp.asarray(logits))
    assert np.abs(np.asarray(g_ref)).sum() > 0
    np.testing.assert_allclose(np.asarray(grad), np.asarray(g_ref), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_null_experts_gradient_matches_finite_differences():
    """Central differences in float64 NumPy of the reference weights (selection held fixed)."""
    e, m, k = 3, 2, 3
    logits = _logits(14, 6, e + m)
    ids, _, valid, _, _ = ref.ref_null_experts(logits, k, m)
    grad, ct = _weights_grad(lambda z: routing.null_experts(z, k, num_null=m), logits, seed=1)
    ct = np.asarray(ct, np.float64)

    def objective(z):
        p = ref.ref_scores(z, "softmax")
        w = np.where(valid, np.take_along_axis(p, np.minimum(ids, e + m - 1), -1), 0.0)
        s = w.sum(-1, keepdims=True)
        return float(np.sum(w / np.where(s > 0, s, 1.0) * ct))

    z0 = logits.astype(np.float64)
    fd = np.zeros_like(z0)
    h = 1e-6
    for idx in np.ndindex(*z0.shape):
        zp, zm = z0.copy(), z0.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (objective(zp) - objective(zm)) / (2 * h)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(k=2, num_null=-1), ["num_null", "-1"]),
        (dict(k=2, num_null=7), ["num_null", "7"]),  # no true expert left
        (dict(k=8, num_null=2), ["k", "8"]),
        (dict(k=0, num_null=2), ["k", "0"]),
    ],
)
def test_null_experts_rejects_bad_arguments(kwargs, names):
    with pytest.raises(ValueError) as err:
        routing.null_experts(jnp.zeros((4, 7)), kwargs["k"], num_null=kwargs["num_null"])
    for name in names:
        assert name in str(err.value)


# ========================================================================================== top-p


def _safe_p(logits, p, margin=1e-4):
    """Moves `p` until no token's cumulative probability lies within `margin` of it (float32 vs
    float64 rounding must not decide the boundary)."""
    probs = ref.ref_scores(logits, "softmax")
    cums = np.cumsum(-np.sort(-probs, -1), -1)
    while np.abs(cums - p).min() < margin:
        p -= 3e-4
    return p


@pytest.mark.parametrize("seed,t,e", [(0, 32, 4), (1, 24, 6), (2, 40, 8)], ids=lambda v: str(v))
@pytest.mark.parametrize("boundary", ["strict", "inclusive"])
def test_top_p_matches_reference(seed, t, e, boundary):
    logits = _logits(seed, t, e)
    counts_seen = set()
    for p0 in (0.2, 0.45, 0.7, 0.9):
        for max_k in (None, e // 2):
            p = _safe_p(logits, p0)
            r = _top_p_jit(jnp.asarray(logits), p, max_k=max_k, boundary=boundary)
            ids, w, valid, probs = ref.ref_top_p(logits, p, max_k=max_k, boundary=boundary)
            _check(r, ids, w, valid, probs, logits, e)
            assert (valid[:, 0]).all()  # at least one expert
            counts_seen.update(valid.sum(-1).tolist())
    assert len(counts_seen) >= 3  # a real variable number of experts per token


def test_top_p_known_answers():
    """The threshold examples of docs/algorithms.md, "Dynamic top-p"."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    r = routing.top_p(logits, 0.4)
    assert r.valid.tolist() == [[True, False, False, False]]
    assert r.expert_ids.tolist() == [[0, 4, 4, 4]]
    np.testing.assert_allclose(np.asarray(r.weights), [[0.5, 0, 0, 0]], rtol=RTOL, atol=ATOL)
    r = routing.top_p(logits, 0.6)
    assert r.expert_ids.tolist() == [[0, 1, 4, 4]]
    np.testing.assert_allclose(np.asarray(r.weights), [[0.5, 0.3, 0, 0]], rtol=RTOL, atol=ATOL)
    # thr = .5 equals the first prefix sum: strict keeps 2, inclusive keeps 1.
    assert routing.top_p(logits, 0.5).valid.tolist() == [[True, True, False, False]]
    assert routing.top_p(logits, 0.5, boundary="strict").expert_ids.tolist() == [[0, 1, 4, 4]]
    r = routing.top_p(logits, 0.5, boundary="inclusive")
    assert r.valid.tolist() == [[True, False, False, False]]


def test_top_p_known_answer_order_is_by_probability():
    """Experts listed in descending probability, whatever their index."""
    logits = jnp.log(jnp.array([[0.05, 0.3, 0.15, 0.5]]))
    r = routing.top_p(logits, 0.6)
    assert r.expert_ids.tolist() == [[3, 1, 4, 4]]
    np.testing.assert_allclose(np.asarray(r.weights), [[0.5, 0.3, 0, 0]], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("thr", [0.8, 0.95])
def test_top_p_exact_prefix_ties_follow_the_router_probabilities(thr):
    """p=[.5,.3,.15,.05]: at a prefix sum equal to the threshold up to float32 rounding, the kept
    count must follow exact arithmetic on the router's own float32 probabilities and the float32
    threshold: .5+.3 == float32(.8) is not > .8 -> keep 3; .5+.3+.15 = 0.95000002 > float32(.95)
    -> keep 3."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    r = routing.top_p(logits, thr)
    probs = np.asarray(r.probs, np.float64)[0]  # float32 values, descending; float64 sums exact
    cum = np.cumsum(probs)
    passed = np.flatnonzero(cum > float(np.float32(thr)))
    n_keep = int(passed[0]) + 1 if passed.size else 4
    assert n_keep == 3
    assert np.asarray(r.valid).sum() == n_keep


@pytest.mark.parametrize("boundary", ["strict", "inclusive"])
def test_top_p_threshold_one_keeps_every_expert(boundary):
    logits = _logits(20, 32, 8, scale=1.0)
    r = routing.top_p(jnp.asarray(logits), 1.0, boundary=boundary)
    assert np.asarray(r.valid).all()
    ids, w, valid, probs = ref.ref_top_p(logits, 1.0, boundary=boundary)
    _check(r, ids, w, valid, probs, logits, 8)


@pytest.mark.parametrize("boundary", ["strict", "inclusive"])
def test_top_p_threshold_one_keeps_every_expert_with_tiny_probabilities(boundary):
    logits = _logits(21, 32, 8, scale=6.0)  # peaked rows: some probabilities ~1e-9
    ids, w, valid, probs = ref.ref_top_p(logits, 1.0, boundary=boundary)
    assert valid.all()
    r = routing.top_p(jnp.asarray(logits), 1.0, boundary=boundary)
    _check(r, ids, w, valid, probs, logits, 8)


def test_top_p_peaked_token_keeps_one_and_flat_token_keeps_many():
    logits = np.array([[12.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6], np.float32)
    for boundary in ("strict", "inclusive"):  # p=.4 is far from every prefix sum (k/6)
        r = routing.top_p(jnp.asarray(logits), 0.4, boundary=boundary)
        assert np.asarray(r.valid).sum(-1).tolist() == [1, 3]
        assert r.expert_ids.tolist()[1] == [0, 1, 2, 6, 6, 6]  # ties -> lower index first
        np.testing.assert_allclose(np.asarray(r.weights)[1, :3], 1 / 6, rtol=RTOL)


def test_top_p_max_k_caps_the_experts():
    e = 8
    logits = _logits(22, 32, e, scale=0.3)  # flat: top-p wants many experts
    p = _safe_p(logits, 0.9)
    full = ref.ref_top_p(logits, p)
    assert full[2].sum(-1).max() > 3
    for max_k in (1, 3, e):
        r = _top_p_jit(jnp.asarray(logits), p, max_k=max_k)
        assert r.expert_ids.shape == (32, max_k)
        assert (np.asarray(r.valid).sum(-1) <= max_k).all()
        np.testing.assert_array_equal(np.asarray(r.expert_ids), full[0][:, :max_k])
        np.testing.assert_allclose(np.asarray(r.weights), full[1][:, :max_k], rtol=RTOL, atol=ATOL)


def test_top_p_traced_threshold_under_jit():
    e = 6
    logits = _logits(23, 24, e)
    fn = jax.jit(lambda z, p: routing.top_p(z, p, max_k=4))
    for p0 in (0.3, 0.6, 0.85):
        p = _safe_p(logits, p0)
        r = fn(jnp.asarray(logits), jnp.float32(p))
        ids, w, valid, probs = ref.ref_top_p(logits, p, max_k=4)
        _check(r, ids, w, valid, probs, logits, e)


@pytest.mark.parametrize("boundary", ["strict", "inclusive"])
def test_top_p_gradient_matches_fixed_ids_reimplementation(boundary):
    e = 6
    logits = _logits(24, 20, e)
    p = _safe_p(logits, 0.6)
    fn = lambda z: routing.top_p(z, p, boundary=boundary)  # noqa: E731
    grad, ct = _weights_grad(fn, logits)
    ids, _, valid, _ = ref.ref_top_p(logits, p, boundary=boundary)
    g_ref = jax.grad(
        lambda z: jnp.sum(ref.ref_masked_weights_jnp(z, ids, valid, normalize=False) * ct)
    )(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), np.asarray(g_ref), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(p=0), ["p=0"]),
        (dict(p=0.0), ["p=0.0"]),
        (dict(p=-0.1), ["p=-0.1"]),
        (dict(p=1.5), ["p=1.5"]),
        (dict(p=0.5, max_k=0), ["max_k", "0"]),
        (dict(p=0.5, max_k=9), ["max_k", "9"]),
        (dict(p=0.5, boundary="loose"), ["boundary", "loose"]),
    ],
)
def test_top_p_rejects_bad_arguments(kwargs, names):
    p = kwargs.pop("p")
    with pytest.raises(ValueError) as err:
        routing.top_p(jnp.zeros((3, 8)), p, **kwargs)
    for name in names:
        assert name in str(err.value)


def test_routing_entropy_is_the_dynamic_loss():
    """: L_d = -(1/T) sum_t sum_i p_ti log p_ti on the top-p router's probabilities."""
    e = 8
    logits = _logits(25, 32, e)
    logits[3] = [40.0] + [-40.0] * (e - 1)  # a one-hot row: p log p must stay finite
    r = _top_p_jit(jnp.asarray(logits), 0.4)
    probs64 = ref.ref_scores(logits, "softmax")
    expected = ref.ref_entropy(probs64)
    np.testing.assert_allclose(float(losses.routing_entropy(r.probs)), expected, rtol=RTOL)
    mask = np.arange(32) % 3 != 0
    got = float(losses.routing_entropy(r.probs, token_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref.ref_entropy(probs64, token_mask=mask), rtol=RTOL)
    # Uniform router: log E per token (the maximum).
    flat = routing.top_p(jnp.zeros((4, e)), 0.4)
    np.testing.assert_allclose(float(losses.routing_entropy(flat.probs)), np.log(e), rtol=RTOL)
    # Differentiable through the router, finite even with a one-hot row.
    g = jax.jit(jax.grad(lambda z: losses.routing_entropy(routing.top_p(z, 0.4).probs)))(
        jnp.asarray(logits)
    )
    g_ref = jax.grad(lambda z: -jnp.mean(jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), -1)))(
        jnp.asarray(logits)
    )
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-3, atol=1e-6)


# ================================================================================== expert choice


@pytest.mark.parametrize("seed,t,e", [(0, 24, 4), (1, 33, 6), (2, 40, 8)])
def test_expert_choice_matches_reference(seed, t, e):
    logits = _logits(seed, t, e)
    for capacity in sorted({0, 1, t // e, 2 * t // e, t - 1, t}):
        r = _expert_choice_jit(jnp.asarray(logits), capacity)
        ids, w, valid, probs = ref.ref_expert_choice(logits, capacity)
        _check(r, ids, w, valid, probs, logits, e)
        # Every expert takes exactly `capacity` tokens.
        assert np.asarray(r.valid).sum(0).tolist() == [capacity] * e
    # At capacity T/E (one expert per token on average) some token gets no expert, some several.
    per_token = ref.ref_expert_choice(logits, t // e)[2].sum(-1)
    assert per_token.min() == 0 and per_token.max() >= 2


def test_expert_choice_capacity_extremes():
    t, e = 20, 4
    logits = _logits(30, t, e)
    r = _expert_choice_jit(jnp.asarray(logits), 0)
    assert not np.asarray(r.valid).any()
    assert (np.asarray(r.weights) == 0).all() and (np.asarray(r.expert_ids) == e).all()
    r = _expert_choice_jit(jnp.asarray(logits), t)
    assert np.asarray(r.valid).all()
    assert np.asarray(r.expert_ids).tolist() == [list(range(e))] * t
    np.testing.assert_allclose(
        np.asarray(r.weights), ref.ref_scores(logits, "softmax"), rtol=RTOL, atol=ATOL
    )


def test_expert_choice_ties_go_to_lower_token_index():
    t, e, c = 10, 3, 4
    r = routing.expert_choice(jnp.zeros((t, e)), c)
    expected = np.zeros((t, e), bool)
    expected[:c] = True
    np.testing.assert_array_equal(np.asarray(r.valid), expected)
    np.testing.assert_allclose(np.asarray(r.weights), expected / e, rtol=RTOL, atol=ATOL)


def test_expert_choice_gradient_matches_fixed_ids_reimplementation():
    t, e, c = 24, 6, 5
    logits = _logits(31, t, e)
    grad, ct = _weights_grad(lambda z: routing.expert_choice(z, c), logits)
    ids, _, valid, _ = ref.ref_expert_choice(logits, c)
    g_ref = jax.grad(
        lambda z: jnp.sum(ref.ref_masked_weights_jnp(z, ids, valid, normalize=False) * ct)
    )(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(g_ref), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("capacity", [-1, 11])
def test_expert_choice_rejects_bad_capacity(capacity):
    with pytest.raises(ValueError) as err:
        routing.expert_choice(jnp.zeros((10, 4)), capacity)
    assert "capacity" in str(err.value) and str(capacity) in str(err.value)


# ============================================================================== null load balance


@pytest.mark.parametrize("null_balance", ["grouped", "individual"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_load_balance_with_null_experts_matches_reference(null_balance, normalization, masked):
    e, m, t = 6, 3, 32
    logits = _logits(40, t, e + m)
    mask = (np.arange(t) % 4 != 1) if masked else None
    for k in (1, 3, 5):
        r = _null_jit(jnp.asarray(logits), k, num_null=m)
        _, _, valid, probs, choices = ref.ref_null_experts(logits, k, m)
        assert (~valid).any() and valid.any()
        got = losses.load_balance(
            r,
            num_experts=e,
            num_null=m,
            null_balance=null_balance,
            normalization=normalization,
            token_mask=None if mask is None else jnp.asarray(mask),
        )
        expected = ref.ref_load_balance_null(
            choices, probs, e, m, normalization, null_balance, token_mask=mask
        )
        np.testing.assert_allclose(float(got), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("null_balance", ["grouped", "individual"])
def test_load_balance_with_null_experts_gradient(null_balance):
    e, m, t, k = 4, 2, 20, 3
    logits = _logits(41, t, e + m)
    _, _, _, _, choices = ref.ref_null_experts(logits, k, m)

    def jmoe_loss(z):
        r = routing.null_experts(z, k, num_null=m)
        return losses.load_balance(r, num_experts=e, num_null=m, null_balance=null_balance)

    def ref_loss(z):
        probs = jax.nn.softmax(z, -1)
        return ref.ref_load_balance_null(
            choices, probs, e, m, "per_assignment_over_k", null_balance
        )

    g = jax.jit(jax.grad(jmoe_loss))(jnp.asarray(logits))
    g_ref = jax.grad(ref_loss)(jnp.asarray(logits))
    assert np.abs(np.asarray(g_ref)).sum() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_grouped_null_balance_ignores_which_null_was_picked():
    """Swapping the two null columns of some tokens moves picks between null experts with the
    same total: "grouped" is unchanged, "individual" changes (and both match the reference)."""
    e, m, t, k = 4, 2, 24, 2
    base = _logits(42, t, e)
    null_a = np.tile(np.array([[1.5, -1.0]], np.float32), (t, 1))
    logits_a = np.concatenate([base, null_a], -1)  # every token prefers null 0 over null 1
    logits_b = logits_a.copy()
    logits_b[::2, e:] = logits_a[::2, e:][:, ::-1]  # half the tokens now prefer null 1
    values = {}
    for name, lg in (("a", logits_a), ("b", logits_b)):
        r = _null_jit(jnp.asarray(lg), k, num_null=m)
        _, _, _, probs, choices = ref.ref_null_experts(lg, k, m)
        for nb in ("grouped", "individual"):
            got = float(losses.load_balance(r, num_experts=e, num_null=m, null_balance=nb))
            expected = ref.ref_load_balance_null(choices, probs, e, m, "per_assignment_over_k", nb)
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
            values[name, nb] = got
    n0_a = (ref.ref_null_experts(logits_a, k, m)[4] == e).sum()
    n0_b = (ref.ref_null_experts(logits_b, k, m)[4] == e).sum()
    assert n0_a > n0_b > 0  # the picks did move between null experts
    np.testing.assert_allclose(values["a", "grouped"], values["b", "grouped"], rtol=1e-6)
    assert abs(values["a", "individual"] - values["b", "individual"]) > 1e-3


def _null_balance_with_offset(normalization, null_balance):
    """load_balance on a routing made with a selection offset vs the reference on the real picks."""
    e, m, t, k, offset = 5, 3, 32, 3, 1.0
    logits = _logits(43, t, e + m)
    r = _null_jit(jnp.asarray(logits), k, num_null=m, null_offset=offset)
    _, _, valid, probs, choices = ref.ref_null_experts(logits, k, m, null_offset=offset)
    _, _, valid0, _, _ = ref.ref_null_experts(logits, k, m)
    assert valid.sum() != valid0.sum()  # the offset does change the picks
    got = losses.load_balance(
        r, num_experts=e, num_null=m, null_balance=null_balance, normalization=normalization
    )
    expected = ref.ref_load_balance_null(choices, probs, e, m, normalization, null_balance)
    np.testing.assert_allclose(float(got), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_grouped_null_balance_with_null_offset_counts_the_actual_picks(normalization):
    _null_balance_with_offset(normalization, "grouped")


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_individual_null_balance_with_null_offset_counts_the_actual_picks(normalization):
    _null_balance_with_offset(normalization, "individual")


@pytest.mark.parametrize("p", [np.float32(1.5), jnp.array(0.0)])
def test_top_p_checks_concrete_array_thresholds(p):
    with pytest.raises(ValueError, match="p="):
        routing.top_p(jnp.zeros((2, 4)), p)
