"""Fused top-k gating (interpreted) against `jax.lax.top_k` on the same logits and a NumPy
count, over the catalogue's routing cases (ties, all tokens on one expert, k = E, ...)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases
from kernel_cases import BACKEND_IDS, BACKENDS, GATING_SHAPES, check_gating

from pallas_kernels import gating, reference

D = 80  # >= 2 * the catalogue's largest token count
TT = 16  # tokens per program: the catalogue's 8..37 tokens make 1..3 programs and a ragged tail
VARIANTS = {
    "softmax": dict(score="softmax"),
    "sigmoid_bias_normalized": dict(score="sigmoid", normalize=True, scale=2.5, bias=True),
}


def _router_inputs(case, seed=0):
    """`x`, `w` whose product is exactly the case's logits: `x` picks rows of `w`, and a second
    random half of `x` meets zero rows of `w` (so the matmul sums real products)."""
    t, e = case.num_tokens, case.num_experts
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.eye(t, D // 2), rng.normal(size=(t, D // 2))], 1).astype(np.float32)
    w = np.zeros((D, e), np.float32)
    w[:t] = case.logits(seed)
    return x, w


@functools.cache
def _gating(backend, k, score, normalize=False, scale=1.0, block_d=None):
    f = functools.partial(gating.top_k_gating, k=k, score=score, normalize=normalize, scale=scale,
                          block_tokens=TT, block_d=block_d, backend=backend,
                          interpret=True)  # fmt: skip
    return jax.jit(lambda x, w, bias: f(x, w, bias=bias))


def _check_case(backend, case, variant, block_d=None):
    opts = dict(VARIANTS[variant])
    use_bias = opts.pop("bias", False)
    x, w = _router_inputs(case)
    e, k = case.num_experts, case.k
    bias = np.linspace(0.0, 0.1, e, dtype=np.float32) if use_bias else np.zeros(e, np.float32)
    ids, weights, counts, probs, logits = _gating(backend, k, **opts, block_d=block_d)(x, w, bias)
    # The oracle: the same logits through jax.nn scores and jax.lax.top_k.
    ref_logits = x @ w
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=case.name)
    scores = jax.nn.softmax(logits) if opts["score"] == "softmax" else jax.nn.sigmoid(logits)
    np.testing.assert_allclose(probs, scores, rtol=1e-6, atol=1e-7, err_msg=case.name)
    # Exactly `jax.lax.top_k`'s choice on the kernel's scores, ties included ...
    _, ref_ids = jax.lax.top_k(probs + bias, k)
    np.testing.assert_array_equal(ids, ref_ids, err_msg=case.name)
    # ... and on the scores recomputed from the logits (no case has near ties of one ulp).
    np.testing.assert_array_equal(ids, jax.lax.top_k(scores + bias, k)[1], err_msg=case.name)
    ref_w = np.take_along_axis(np.asarray(scores), np.asarray(ref_ids), -1)
    if opts.get("normalize") and k > 1:
        ref_w = ref_w / ref_w.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, ref_w * opts.get("scale", 1.0), rtol=1e-6,
                               err_msg=case.name)  # fmt: skip
    np.testing.assert_array_equal(counts, np.bincount(np.ravel(ref_ids), minlength=e))
    if case.name == "all_to_one_expert":
        assert counts[0] == case.num_tokens
    if case.name == "ties" and not use_bias:  # equal scores: the lowest indices win
        np.testing.assert_array_equal(ids, np.tile(np.arange(k), (case.num_tokens, 1)))


# Each case has its own (T, E, k), so each compiles: the Mosaic kernel runs the whole catalogue,
# the Triton one the cases that stress it most; the variants alternate over the cases.
TRITON_CASES = ("ragged_tail", "k_equals_e", "ties")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_matches_top_k_over_routing_catalogue(backend):
    cases = shape_cases.ROUTING_CASES
    if backend == "gpu":
        cases = [c for c in cases if c.name in TRITON_CASES]
    for i, case in enumerate(cases):
        variant = "softmax" if case.name == "ties" else list(VARIANTS)[i % 2]
        _check_case(backend, case, variant)


def test_router_width_in_chunks():
    """The logits matmul summed over D in chunks (5 on TPU, 3 padded ones of 32 on GPU) gives the
    same routing."""
    case = shape_cases.ROUTING_CASES[1]
    _check_case("tpu", case, "softmax", block_d=16)
    _check_case("gpu", case, "sigmoid_bias_normalized", block_d=32)


# (score, normalize, k) over 5 experts: k = 3 also pads the slots to 4 on the Triton path.
GRAD_VARIANTS = [("softmax", False, 3), ("sigmoid", True, 2), ("softmax", True, 1)]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("score,normalize,k", GRAD_VARIANTS)
def test_gradients_match_reference(backend, score, normalize, k):
    case = shape_cases.ROUTING_CASES[1]  # ragged tail: 37 tokens, 5 experts
    x, w = _router_inputs(case, seed=1)
    x = x + np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    bias = np.linspace(0.0, 0.05, case.num_experts, dtype=np.float32)
    rng = np.random.default_rng(3)
    ct_w, ct_p, ct_l = (rng.normal(size=s).astype(np.float32)
                        for s in ((37, k), (37, 5), (37, 5)))  # fmt: skip

    def loss(fn, x, w):
        _, weights, _, probs, logits = fn(x, w, bias)
        return (weights * ct_w).sum() + (probs * ct_p).sum() + (logits * ct_l).sum()

    kernel = _gating(backend, k, score, normalize=normalize, scale=1.5, block_d=16)
    ref = functools.partial(reference.top_k_gating, k=k, score=score, normalize=normalize,
                            scale=1.5)  # fmt: skip
    grads = jax.grad(functools.partial(loss, kernel), (0, 1))(x, w)
    ref_grads = jax.grad(lambda x, w: loss(lambda x, w, b: ref(x, w, bias=b), x, w), (0, 1))(x, w)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5)


def test_bfloat16_input_and_errors():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(20, D)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(5).normal(size=(D, 4)), jnp.float32)
    ids, _, counts, _, logits = gating.top_k_gating(x, w, 2, interpret=True)
    np.testing.assert_allclose(logits, np.asarray(x, np.float32) @ np.asarray(w), rtol=1e-5,
                               atol=1e-4)  # fmt: skip
    np.testing.assert_array_equal(ids, jax.lax.top_k(jax.nn.softmax(logits), 2)[1])
    assert int(counts.sum()) == 40
    with pytest.raises(ValueError, match="k=5"):
        gating.top_k_gating(x, w, 5, interpret=True)
    with pytest.raises(ValueError, match="'tanh'"):
        gating.top_k_gating(x, w, 2, score="tanh", interpret=True)
    with pytest.raises(ValueError, match="bias has shape"):
        gating.top_k_gating(x, w, 2, bias=jnp.zeros(3), interpret=True)
    with pytest.raises(ValueError, match="block_tokens=12 is not a multiple of 8"):
        gating.top_k_gating(x, w, 2, block_tokens=12, backend="tpu")
    with pytest.raises(ValueError, match="block_tokens=24 is not a power of two"):
        gating.top_k_gating(x, w, 2, block_tokens=24, backend="gpu")
    with pytest.raises(ValueError, match="block_d=24 does not divide the model width 80"):
        gating.top_k_gating(x, w, 2, block_d=24, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="block_d=16 is neither a multiple of 128"):
        gating.top_k_gating(x, w, 2, block_d=16, backend="tpu")
    with pytest.raises(ValueError, match="block_d=48 is not a power of two"):
        gating.top_k_gating(x, w, 2, block_d=48, backend="gpu")


def test_mosaic_accumulation_starts_from_zero():
    """The TPU interpreter with NaN-filled fresh buffers models Mosaic's blocks: the logits summed
    over D chunks must start from zeros, and every output must be written."""
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    nan_buffers = pltpu.InterpretParams(uninitialized_memory="nan")
    x = jnp.asarray(np.random.default_rng(6).normal(size=(20, 256)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(256, 6)) / 16, jnp.float32)
    run = functools.partial(gating.top_k_gating, k=3, block_tokens=8, block_d=128, backend="tpu")
    for got, want in zip(run(x, w, interpret=nan_buffers), run(x, w, interpret=True), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(run(x, w, interpret=nan_buffers)[4], x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("shape", GATING_SHAPES[1:], ids=str)
def test_compiled_check_interpreted(backend, shape):
    """`test_compiled.py`'s gating check at its non-power-of-two and group-limited shapes,
    interpreted: the same oracle the accelerators must pass."""
    check_gating(backend, *shape, interpret=True)


def _group_limited_loop(sel_TxE, k, n_groups, top_groups, group_score):
    """NumPy, one token at a time: the ids of group-limited top-k (groups scored by the sum of
    their 2 best scores, "top2_sum", or their best, "max"; ties to the lowest index)."""
    t, e = sel_TxE.shape
    size, ids = e // n_groups, []
    for row in np.asarray(sel_TxE, np.float64):
        groups = row.reshape(n_groups, size)
        best = {"top2_sum": 2, "max": 1}[group_score]
        score_G = np.sort(groups, axis=1)[:, ::-1][:, :best].sum(1)
        kept = sorted(range(n_groups), key=lambda g: (-score_G[g], g))[:top_groups]
        eligible = [i for i in range(e) if i // size in kept]
        ids.append(sorted(eligible, key=lambda i: (-row[i], i))[:k])
    return np.array(ids)


# (E, k, n_groups, top_groups, group_score): k below, at and above 2 * top_groups, and 12
# experts (padded to 16 on the Triton path, so a padded column sits past the last group).
GROUP_CASES = [
    (16, 3, 4, 2, "top2_sum"),
    (16, 4, 4, 2, "max"),
    (12, 6, 3, 3, "top2_sum"),
    (8, 2, 4, 1, "top2_sum"),
    (16, 7, 4, 2, "max"),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("e,k,n_groups,top_groups,group_score", GROUP_CASES)
def test_group_limited_matches_per_token_loop(backend, e, k, n_groups, top_groups, group_score):
    rng = np.random.default_rng(e + k)
    x = rng.normal(size=(37, 24)).astype(np.float32)
    w = rng.normal(size=(24, e)).astype(np.float32)
    w[:, : e // n_groups] = w[:, :1]  # the first group: equal scores inside it (ties)
    bias = np.linspace(0.0, 0.1, e, dtype=np.float32)
    ids, weights, counts, probs, _ = gating.top_k_gating(
        x, w, k, score="sigmoid", bias=bias, normalize=True, n_groups=n_groups,
        top_groups=top_groups, group_score=group_score, block_tokens=TT, backend=backend,
        interpret=True,
    )  # fmt: skip
    expected = _group_limited_loop(probs + bias, k, n_groups, top_groups, group_score)
    np.testing.assert_array_equal(ids, expected)
    chosen = np.take_along_axis(np.asarray(probs), np.asarray(ids), -1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(np.ravel(ids), minlength=e))


def test_group_ties_go_to_the_lowest_group():
    """Groups 1 and 2 tie (their top-2 sums are both exactly 1): only group 1 is eligible, so
    the second pick is its 0.25 and not group 2's 0.5. All-equal scores pick the first experts."""
    offsets = np.full(16, -0.5, np.float32)
    offsets[4:6], offsets[8:10] = (0.25, -0.25), (0.0, 0.0)
    x, w = np.ones((5, 8), np.float32), np.zeros((8, 16), np.float32)  # sigmoid scores: all 0.5
    kw = dict(score="sigmoid", n_groups=4, top_groups=1, interpret=True)
    ids = gating.top_k_gating(x, w, 2, bias=offsets, **kw)[0]
    np.testing.assert_array_equal(ids, np.tile([4, 5], (5, 1)))
    ids = gating.top_k_gating(x, w, 3, n_groups=4, top_groups=2, interpret=True)[0]
    np.testing.assert_array_equal(ids, np.tile([0, 1, 2], (5, 1)))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_group_limited_and_k1_renormalised_gradients(backend):
    rng = np.random.default_rng(8)
    x, w = (
        rng.normal(size=(37, 24)).astype(np.float32),
        rng.normal(size=(24, 16)).astype(np.float32),
    )
    ct_w, ct_p = rng.normal(size=(37, 3)), rng.normal(size=(37, 16))
    for opts in (dict(k=3, n_groups=4, top_groups=2, normalize=True, score="sigmoid"),
                 dict(k=1, normalize=True, renorm_when_k1=True)):  # fmt: skip
        ct = ct_w[:, : opts["k"]]

        def loss(fn, x, w, opts=opts, ct=ct):
            _, weights, _, probs, _ = fn(x, w, **opts)
            return (weights * ct).sum() + (probs * ct_p).sum()

        kernel = functools.partial(gating.top_k_gating, block_tokens=TT, backend=backend,
                                   interpret=True)  # fmt: skip
        grads = jax.grad(functools.partial(loss, kernel), (0, 1))(x, w)
        ref_grads = jax.grad(functools.partial(loss, reference.top_k_gating), (0, 1))(x, w)
        for g, rg in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5, err_msg=str(opts))
    weights = gating.top_k_gating(x, w, 1, normalize=True, renorm_when_k1=True, interpret=True)[1]
    np.testing.assert_allclose(weights, 1.0, rtol=1e-6)


def test_group_errors_name_the_values():
    x, w = np.ones((4, 8), np.float32), np.ones((8, 16), np.float32)
    for kw, match in [
        (dict(n_groups=4), "needs both"),
        (dict(n_groups=5, top_groups=1), "n_groups=5 must divide num_experts=16"),
        (dict(n_groups=4, top_groups=5), r"top_groups=5 must be in \[1, n_groups=4\]"),
        (dict(n_groups=8, top_groups=1), "k=3 exceeds the 2 experts of top_groups=1"),
    ]:
        with pytest.raises(ValueError, match=match):
            gating.top_k_gating(x, w, 3, interpret=True, **kw)
