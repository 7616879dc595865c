"""jmoe.routing.top_k against the plain reference in tests/moe_reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases

import moe_reference as ref
from jmoe.moe import routing

RTOL, ATOL = 1e-5, 1e-6


def _check(r, logits, k, **kw):
    """Compares a jmoe Routing with ref_top_k on the same logits and options."""
    ids, w, p = ref.ref_top_k(np.asarray(logits), k, **kw)
    t = np.asarray(logits).shape[0]
    assert isinstance(r, routing.Routing)
    assert r.expert_ids.shape == (t, k) and r.expert_ids.dtype == jnp.int32
    assert r.weights.shape == (t, k) and r.weights.dtype == jnp.float32
    assert r.valid.dtype == jnp.bool_ and bool(r.valid.all())
    np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(r.weights), w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(r.probs), p, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(r.logits), np.asarray(logits, np.float32))
    return ids, w, p


# ---------------------------------------------------------------------------------- catalogue


@pytest.mark.parametrize("case", shape_cases.ROUTING_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 1.0), (True, 2.5), (False, 16.0)])
def test_catalogue_cases_match_reference(case, score, normalize, scale):
    logits = case.logits(seed=1)
    r = routing.top_k(jnp.asarray(logits), case.k, score=score, normalize=normalize, scale=scale)
    ids, _, _ = _check(r, logits, case.k, score=score, normalize=normalize, scale=scale)
    # Selection never repeats an expert within a token.
    assert all(len(set(row)) == case.k for row in ids.tolist())


def test_catalogue_ties_go_to_lower_index():
    case = next(c for c in shape_cases.ROUTING_CASES if c.name == "ties")
    for score in ("softmax", "sigmoid"):
        r = routing.top_k(jnp.asarray(case.logits()), case.k, score=score)
        np.testing.assert_array_equal(
            np.asarray(r.expert_ids), np.tile(np.arange(case.k), (case.num_tokens, 1))
        )


def test_catalogue_empty_and_one_expert_cases_hit_their_situation():
    """The catalogue logits really produce the situation named (else the cases test nothing)."""
    by_name = {c.name: c for c in shape_cases.ROUTING_CASES}
    c = by_name["all_to_one_expert"]
    r = routing.top_k(jnp.asarray(c.logits()), c.k)
    assert (np.asarray(r.expert_ids) == 0).all()
    c = by_name["empty_experts"]
    r = routing.top_k(jnp.asarray(c.logits()), c.k)
    assert (np.asarray(r.expert_ids) % 2 == 0).all()
    c = by_name["one_token_per_expert"]
    r = routing.top_k(jnp.asarray(c.logits()), c.k)
    np.testing.assert_array_equal(np.asarray(r.expert_ids)[:, 0], np.arange(c.num_tokens))


# ---------------------------------------------------------------------------------- options


def _logits(t, e, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=(t, e))).astype(np.float32)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
def test_random_logits_with_bias(score, normalize):
    logits = _logits(40, 8, seed=3)
    bias = np.random.default_rng(4).normal(size=8).astype(np.float32) * 0.3
    r = routing.top_k(
        jnp.asarray(logits), 3, score=score, normalize=normalize, scale=1.5, bias=jnp.asarray(bias)
    )
    _check(r, logits, 3, score=score, normalize=normalize, scale=1.5, bias=bias)


def test_bias_changes_selection_but_weights_stay_unbiased():
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0]], np.float32)
    bias = np.array([0.0, 0.0, 0.0, 10.0], np.float32)
    p = ref.ref_scores(logits, "softmax")
    r = routing.top_k(jnp.asarray(logits), 2, bias=jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(r.expert_ids), [[3, 0], [3, 1]])
    np.testing.assert_allclose(
        np.asarray(r.weights), [[p[0, 3], p[0, 0]], [p[1, 3], p[1, 1]]], rtol=RTOL, atol=ATOL
    )
    unbiased = routing.top_k(jnp.asarray(logits), 2)
    np.testing.assert_array_equal(np.asarray(unbiased.expert_ids), [[0, 1], [1, 3]])
    # probs reported are the unbiased scores
    np.testing.assert_allclose(np.asarray(r.probs), p, rtol=RTOL, atol=ATOL)
    _check(r, logits, 2, bias=bias)


def test_sigmoid_normalize_scale_deepseek_v3_style():
    logits = _logits(16, 16, seed=5, scale=2.0)
    bias = np.random.default_rng(6).normal(size=16).astype(np.float32) * 0.2
    r = routing.top_k(
        jnp.asarray(logits),
        4,
        score="sigmoid",
        normalize=True,
        scale=2.5,
        bias=jnp.asarray(bias),
        n_groups=4,
        top_groups=2,
    )
    _, w, _ = _check(
        r,
        logits,
        4,
        score="sigmoid",
        normalize=True,
        scale=2.5,
        bias=bias,
        n_groups=4,
        top_groups=2,
    )
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "e,k,n_groups,top_groups",
    [
        (8, 2, 4, 2),
        (16, 4, 4, 2),
        (16, 3, 4, 2),
        (16, 1, 4, 3),
        (12, 4, 3, 1),
        (8, 8, 2, 2),
        (16, 6, 8, 3),
    ],
)
def test_group_limited_matches_reference(score, e, k, n_groups, top_groups):
    logits = _logits(48, e, seed=7 + e + k)
    bias = np.random.default_rng(k).normal(size=e).astype(np.float32) * 0.1
    for b in (None, bias):
        r = routing.top_k(
            jnp.asarray(logits),
            k,
            score=score,
            n_groups=n_groups,
            top_groups=top_groups,
            normalize=True,
            bias=None if b is None else jnp.asarray(b),
        )
        _check(
            r,
            logits,
            k,
            score=score,
            n_groups=n_groups,
            top_groups=top_groups,
            normalize=True,
            bias=b,
        )


def test_group_limited_actually_restricts_selection():
    """Without groups a token would pick from 3 groups; with top_groups=1 only one group is used."""
    s = np.array([[0.9, 0.1, 0.85, 0.0, 0.8, 0.05]], np.float32)
    logits = np.log(s / (1 - s) + 1e-30).astype(np.float32)
    free = routing.top_k(jnp.asarray(logits), 2, score="sigmoid")
    np.testing.assert_array_equal(np.asarray(free.expert_ids), [[0, 2]])
    # per-group score = top-2 sum: [1.0, 0.85, 0.85] -> group 0 -> experts 0, 1
    r = routing.top_k(jnp.asarray(logits), 2, score="sigmoid", n_groups=3, top_groups=1)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), [[0, 1]])
    _check(r, logits, 2, score="sigmoid", n_groups=3, top_groups=1)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_large_negative_bias_regression(score):
    """docs/algorithms.md: masked groups must be -inf, not 0.0.

    All biases are large and negative, so every biased score of a kept group is < 0; masking the
    other groups with 0.0 (HF <= 4.57.1) would make their experts outrank the kept ones.
    """
    t, e, n_groups, top_groups, k = 32, 16, 4, 2, 4
    m = e // n_groups
    logits = _logits(t, e, seed=11, scale=2.0)
    bias = (-100.0 + np.random.default_rng(12).normal(size=e) * 0.5).astype(np.float32)
    r = routing.top_k(
        jnp.asarray(logits),
        k,
        score=score,
        bias=jnp.asarray(bias),
        n_groups=n_groups,
        top_groups=top_groups,
    )
    ids, _, p = _check(
        r, logits, k, score=score, bias=bias, n_groups=n_groups, top_groups=top_groups
    )
    # Independently: the chosen experts lie in the token's top_groups best groups.
    sel = p + bias
    per_group = max(1, k // top_groups)
    for i in range(t):
        gscore = np.sort(sel[i].reshape(n_groups, m), axis=-1)[:, ::-1][:, :per_group].sum(-1)
        best = set(np.argsort(-gscore, kind="stable")[:top_groups].tolist())
        assert {int(x) // m for x in ids[i]} <= best, (i, ids[i], best)


def test_group_limited_negative_bias_hand_example():
    # E=4, 2 groups of 2, top_groups=1, k=2 (group score = top-2 sum). Biases -10 everywhere:
    # group 0 (scores 0.9, 0.8) wins; with 0.0-masking expert 2 or 3 (masked) would win.
    s = np.array([[0.9, 0.8, 0.2, 0.1]], np.float32)
    logits = np.log(s / (1 - s)).astype(np.float32)
    bias = jnp.full((4,), -10.0)
    r = routing.top_k(jnp.asarray(logits), 2, score="sigmoid", bias=bias, n_groups=2, top_groups=1)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), [[0, 1]])
    np.testing.assert_allclose(np.asarray(r.weights), s[:, :2], rtol=RTOL)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_k1_normalize_keeps_raw_probability(score):
    logits = _logits(10, 5, seed=13)
    p = ref.ref_scores(logits, score)
    r = routing.top_k(jnp.asarray(logits), 1, score=score, normalize=True, scale=2.0)
    np.testing.assert_allclose(np.asarray(r.weights)[:, 0], 2.0 * p.max(-1), rtol=RTOL)
    _check(r, logits, 1, score=score, normalize=True, scale=2.0)
    r1 = routing.top_k(
        jnp.asarray(logits), 1, score=score, normalize=True, scale=2.0, renorm_when_k1=True
    )
    np.testing.assert_allclose(np.asarray(r1.weights), 2.0, rtol=RTOL)
    _check(r1, logits, 1, score=score, normalize=True, scale=2.0, renorm_when_k1=True)
    # renorm_when_k1 without normalize does nothing
    r2 = routing.top_k(jnp.asarray(logits), 1, score=score, renorm_when_k1=True)
    np.testing.assert_allclose(np.asarray(r2.weights)[:, 0], p.max(-1), rtol=RTOL)


def test_k_equals_e_is_a_dense_mixture():
    logits = _logits(6, 5, seed=14)
    p = ref.ref_scores(logits, "softmax")
    r = routing.top_k(jnp.asarray(logits), 5, normalize=True)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), np.argsort(-p, axis=-1))
    np.testing.assert_allclose(np.asarray(r.weights), -np.sort(-p, axis=-1), rtol=RTOL, atol=ATOL)
    _check(r, logits, 5, normalize=True)


def test_low_precision_logits_are_routed_in_float32():
    logits = _logits(12, 6, seed=15)
    r = routing.top_k(jnp.asarray(logits, jnp.bfloat16), 2, normalize=True)
    assert r.weights.dtype == jnp.float32 and r.probs.dtype == jnp.float32
    as_f32 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    _check(r, as_f32, 2, normalize=True)


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "kw",
    [
        dict(score="softmax"),
        dict(score="softmax", normalize=True, scale=2.0),
        dict(score="sigmoid", normalize=True, scale=2.5),
        dict(score="sigmoid"),
        dict(score="softmax", normalize=True, renorm_when_k1=True),
    ],
)
def test_weight_gradient_matches_reference(kw):
    t, e, k = 12, 6, 2
    logits = _logits(t, e, seed=16)
    ct = np.random.default_rng(17).normal(size=(t, k)).astype(np.float32)
    bias = np.random.default_rng(18).normal(size=e).astype(np.float32) * 0.2
    ids, _, _ = ref.ref_top_k(logits, k, bias=bias, **kw)

    def f_jmoe(z):
        return jnp.sum(routing.top_k(z, k, bias=jnp.asarray(bias), **kw).weights * ct)

    def f_ref(z):
        return jnp.sum(ref.ref_weights_jnp(z, ids, **kw) * ct)

    z = jnp.asarray(logits)
    np.testing.assert_allclose(f_jmoe(z), f_ref(z), rtol=1e-5)
    g = jax.grad(f_jmoe)(z)
    g_ref = jax.grad(f_ref)(z)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g).max()) > 1e-3  # the router does get a gradient
    # Bias shifts selection only: no gradient reaches it.
    g_b = jax.grad(lambda b: jnp.sum(routing.top_k(z, k, bias=b, **kw).weights * ct))(
        jnp.asarray(bias)
    )
    np.testing.assert_array_equal(np.asarray(g_b), 0.0)


def test_weight_gradient_finite_differences():
    t, e, k = 4, 5, 2
    logits = _logits(t, e, seed=19).astype(np.float64)
    ct = np.random.default_rng(20).normal(size=(t, k))
    ids, _, _ = ref.ref_top_k(logits, k, score="sigmoid", normalize=True)

    def f_np(z):  # float64, fixed ids
        s = 1 / (1 + np.exp(-z))
        w = np.take_along_axis(s, ids, -1)
        return np.sum(w / w.sum(-1, keepdims=True) * ct)

    eps = 1e-6
    fd = np.zeros_like(logits)
    for i in range(t):
        for j in range(e):
            d = np.zeros_like(logits)
            d[i, j] = eps
            fd[i, j] = (f_np(logits + d) - f_np(logits - d)) / (2 * eps)
    g = jax.grad(
        lambda z: jnp.sum(
            routing.top_k(z, k, score="sigmoid", normalize=True).weights
            * jnp.asarray(ct, jnp.float32)
        )
    )(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-5)
    # Unselected experts get no gradient with sigmoid (scores are independent per expert).
    unselected = np.ones((t, e), bool)
    np.put_along_axis(unselected, ids, False, -1)
    np.testing.assert_array_equal(np.asarray(g)[unselected], 0.0)


# ---------------------------------------------------------------------------------- pytree


def test_routing_is_a_pytree():
    logits = jnp.asarray(_logits(7, 4, seed=21))
    r = routing.top_k(logits, 2, normalize=True)
    leaves, treedef = jax.tree.flatten(r)
    assert len(leaves) == 5
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, routing.Routing)
    doubled = jax.tree.map(lambda x: x * 2, r)
    assert isinstance(doubled, routing.Routing)
    np.testing.assert_allclose(doubled.weights, 2 * r.weights)
    np.testing.assert_array_equal(doubled.expert_ids, 2 * r.expert_ids)
    assert r.num_slots == 2


def test_routing_round_trips_through_jit():
    logits = _logits(9, 6, seed=22)
    bias = jnp.linspace(-0.1, 0.1, 6)
    eager = routing.top_k(jnp.asarray(logits), 3, score="sigmoid", normalize=True, bias=bias)
    jitted = jax.jit(lambda z, b: routing.top_k(z, 3, score="sigmoid", normalize=True, bias=b))(
        jnp.asarray(logits), bias
    )
    assert isinstance(jitted, routing.Routing)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # A Routing can be passed into a jitted function as an argument, too.
    total = jax.jit(lambda r: jnp.sum(r.weights * r.valid) + r.expert_ids.sum())(eager)
    np.testing.assert_allclose(total, np.sum(eager.weights) + np.sum(eager.expert_ids), rtol=1e-6)
    _check(jitted, logits, 3, score="sigmoid", normalize=True, bias=np.asarray(bias))


def test_routing_is_frozen():
    r = routing.top_k(jnp.zeros((2, 3)), 1)
    with pytest.raises((AttributeError, TypeError)):
        r.weights = r.weights * 0  # type: ignore[misc]


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=5), "k=5"),
        (dict(k=0), "k=0"),
        (dict(k=2, n_groups=3, top_groups=1), "n_groups=3"),
        (dict(k=2, n_groups=2, top_groups=3), "top_groups=3"),
        (dict(k=2, n_groups=2), "top_groups"),
        (dict(k=2, top_groups=1), "n_groups"),
        (dict(k=3, n_groups=2, top_groups=1), "k=3"),  # only 2 eligible experts
        (dict(k=2, score="relu"), "relu"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    logits = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=match):
        routing.top_k(logits, **kwargs)
