"""jmoe.losses against the plain reference in tests/moe_reference.py and the known-answer table."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from jmoe.moe import losses, routing
from jmoe.moe.routing import Routing

RTOL, ATOL = 1e-5, 1e-6
NORMS = ("switch_top1", "per_assignment", "per_assignment_over_k")


def _routing(ids, probs, logits=None, valid=None, weights=None):
    """A hand-built Routing (losses are tested independently of the routers)."""
    ids = np.asarray(ids, np.int32)
    valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid, bool)
    probs = jnp.asarray(probs, jnp.float32)
    logits = jnp.zeros_like(probs) if logits is None else jnp.asarray(logits, jnp.float32)
    weights = jnp.where(valid, 0.5, 0.0) if weights is None else weights
    return Routing(
        jnp.asarray(ids), jnp.asarray(weights, jnp.float32), jnp.asarray(valid), probs, logits
    )


def _random_case(t=24, e=6, k=2, score="softmax", seed=0, invalid_fraction=0.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, e)).astype(np.float32)
    ids, _, probs = ref.ref_top_k(logits, k, score=score)
    valid = rng.random((t, k)) >= invalid_fraction
    ids = np.where(valid, ids, e)  # unused slots hold num_experts
    return logits, ids, valid, probs.astype(np.float32)


def _mask(t, seed):
    m = np.random.default_rng(seed).random(t) < 0.7
    m[0] = True
    return m


# ---------------------------------------------------------------------------------- load balance


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balance_matches_reference(normalization, score, masked):
    logits, ids, valid, probs = _random_case(
        t=30, e=6, k=3, score=score, seed=1, invalid_fraction=0.2
    )
    mask = _mask(30, 2) if masked else None
    r = _routing(ids, probs, logits, valid)
    got = losses.load_balance(
        r,
        num_experts=6,
        normalization=normalization,
        token_mask=None if mask is None else jnp.asarray(mask),
    )
    want = ref.ref_load_balance(ids, valid, probs, 6, normalization, token_mask=mask)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_load_balance_mask_changes_the_value():
    """The masked tokens really are excluded (else the masked test above could pass vacuously)."""
    logits, ids, valid, probs = _random_case(t=30, e=6, k=2, seed=3)
    r = _routing(ids, probs, logits, valid)
    mask = np.arange(30) < 10
    masked = losses.load_balance(r, num_experts=6, token_mask=jnp.asarray(mask))
    first10 = losses.load_balance(
        _routing(ids[:10], probs[:10], logits[:10], valid[:10]), num_experts=6
    )
    full = losses.load_balance(r, num_experts=6)
    np.testing.assert_allclose(masked, first10, rtol=RTOL)
    assert abs(float(masked) - float(full)) > 1e-3


def test_load_balance_collapse_is_e():
    # E=4, k=1, every token sends p=1 to expert 0 -> switch_top1 loss = E = 4 (the maximum).
    logits = np.tile(np.array([100.0, 0.0, 0.0, 0.0], np.float32), (16, 1))
    r = routing.top_k(jnp.asarray(logits), 1)
    for normalization in NORMS:  # k = 1: all three agree
        np.testing.assert_allclose(
            losses.load_balance(r, num_experts=4, normalization=normalization), 4.0, rtol=1e-6
        )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balance_perfect_balance_table(k):
    """Uniform router, every expert gets the same number of assignments (docs/algorithms.md)."""
    e, t = 8, 16
    ids = (np.arange(t)[:, None] + np.arange(k)[None, :] * (e // k)) % e  # distinct per token
    counts = np.bincount(ids.ravel(), minlength=e)
    assert (counts == counts[0]).all() and (np.bincount(ids[:, 0], minlength=e) == t // e).all()
    probs = np.full((t, e), 1.0 / e)
    r = _routing(ids, probs)
    want = {"switch_top1": 1.0, "per_assignment": float(k), "per_assignment_over_k": 1.0}
    for normalization, value in want.items():
        got = losses.load_balance(r, num_experts=e, normalization=normalization)
        np.testing.assert_allclose(got, value, rtol=1e-6)
        np.testing.assert_allclose(
            ref.ref_load_balance(ids, r.valid, probs, e, normalization), value, rtol=1e-12
        )


def test_load_balance_switch_top1_counts_first_choice_only():
    # Slot 0 always expert 0, slot 1 spread: switch_top1 sees a collapse, the others do not.
    t, e = 8, 4
    ids = np.stack([np.zeros(t, int), 1 + np.arange(t) % 3], -1)
    probs = np.full((t, e), 0.25)
    r = _routing(ids, probs)
    np.testing.assert_allclose(
        losses.load_balance(r, num_experts=e, normalization="switch_top1"),
        4.0 * 1.0 * 0.25,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.load_balance(r, num_experts=e, normalization="per_assignment"), 2.0, rtol=1e-6
    )


def test_load_balance_sigmoid_probs_are_row_normalised():
    t, e = 6, 4
    ids = np.zeros((t, 1), int)
    probs = np.tile([0.8, 0.8, 0.2, 0.2], (t, 1))  # rows sum to 2 -> normalised 0.4, 0.4, 0.1, 0.1
    r = _routing(ids, probs)
    np.testing.assert_allclose(
        losses.load_balance(r, num_experts=e, normalization="switch_top1"), 4 * 1.0 * 0.4, rtol=1e-6
    )


@pytest.mark.parametrize("normalization", NORMS)
def test_load_balance_gradient_flows_through_p_only(normalization):
    logits, ids, valid, _ = _random_case(t=20, e=5, k=2, seed=4, invalid_fraction=0.1)
    mask = _mask(20, 5)

    def f_jmoe(z):
        r = _routing(ids, jax.nn.softmax(z, -1), z, valid)
        return losses.load_balance(
            r, num_experts=5, normalization=normalization, token_mask=jnp.asarray(mask)
        )

    def f_ref(z):
        return ref.ref_load_balance(
            ids, valid, jax.nn.softmax(z, -1), 5, normalization, token_mask=mask
        )

    z = jnp.asarray(logits)
    np.testing.assert_allclose(f_jmoe(z), f_ref(z), rtol=RTOL)
    g, g_ref = jax.grad(f_jmoe)(z), jax.grad(f_ref)(z)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)  # padding gets no gradient


def test_load_balance_gradient_through_router_top_k():
    """End to end from logits with jmoe's own router: the ids carry no gradient, only P does."""
    logits = np.random.default_rng(6).normal(size=(16, 4)).astype(np.float32)
    ids, _, _ = ref.ref_top_k(logits, 2)

    def f(z):
        return losses.load_balance(
            routing.top_k(z, 2), num_experts=4, normalization="per_assignment"
        )

    g = jax.grad(f)(jnp.asarray(logits))
    g_ref = jax.grad(
        lambda z: ref.ref_load_balance(
            ids, np.ones_like(ids, bool), jax.nn.softmax(z, -1), 4, "per_assignment"
        )
    )(jnp.asarray(logits))
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7)


def test_load_balance_rejects_unknown_normalization():
    r = _routing(np.zeros((2, 1), int), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="hf"):
        losses.load_balance(r, num_experts=2, normalization="hf")


# ---------------------------------------------------------------------------------- counts


def test_expert_counts_matches_bincount():
    _, ids, valid, _ = _random_case(t=40, e=7, k=3, seed=7, invalid_fraction=0.25)
    mask = _mask(40, 8)
    got = losses.expert_counts(jnp.asarray(ids), jnp.asarray(valid), 7)
    keep = valid & (ids < 7)
    np.testing.assert_array_equal(got, np.bincount(ids[keep], minlength=7))
    got_m = losses.expert_counts(
        jnp.asarray(ids), jnp.asarray(valid), 7, token_mask=jnp.asarray(mask)
    )
    np.testing.assert_array_equal(got_m, np.bincount(ids[keep & mask[:, None]], minlength=7))
    # An invalid slot is never counted, even if it names a real expert.
    real_ids = np.where(valid, ids, 3)
    got_r = losses.expert_counts(jnp.asarray(real_ids), jnp.asarray(valid), 7)
    np.testing.assert_array_equal(got_r, np.bincount(ids[keep], minlength=7))


# ---------------------------------------------------------------------------------- z-loss, entropy


@pytest.mark.parametrize("masked", [False, True])
def test_router_z_loss_matches_reference(masked):
    logits = 3.0 * np.random.default_rng(9).normal(size=(25, 6)).astype(np.float32)
    mask = _mask(25, 10) if masked else None
    got = losses.router_z_loss(
        jnp.asarray(logits), token_mask=None if mask is None else jnp.asarray(mask)
    )
    np.testing.assert_allclose(got, ref.ref_z_loss(logits, mask), rtol=RTOL)


def test_router_z_loss_known_value_and_gradient():
    np.testing.assert_allclose(losses.router_z_loss(jnp.zeros((5, 8))), math.log(8) ** 2, rtol=1e-6)
    np.testing.assert_allclose(losses.router_z_loss(jnp.zeros((5, 8))), 4.3241, atol=1e-4)
    # d/dz mean_t lse_t^2 = 2 lse_t softmax(z_t) / T
    z = np.random.default_rng(11).normal(size=(4, 3)).astype(np.float32)
    lse = np.log(np.exp(z.astype(np.float64)).sum(-1, keepdims=True))
    want = 2 * lse * np.exp(z - lse) / 4
    np.testing.assert_allclose(jax.grad(losses.router_z_loss)(jnp.asarray(z)), want, rtol=1e-5)
    # large logits stay finite (logsumexp, not log(sum(exp)))
    assert np.isfinite(float(losses.router_z_loss(jnp.full((2, 4), 200.0))))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("masked", [False, True])
def test_routing_entropy_matches_reference(score, masked):
    logits = np.random.default_rng(12).normal(size=(25, 6)).astype(np.float32)
    probs = ref.ref_scores(logits, score).astype(np.float32)
    mask = _mask(25, 13) if masked else None
    got = losses.routing_entropy(
        jnp.asarray(probs), token_mask=None if mask is None else jnp.asarray(mask)
    )
    np.testing.assert_allclose(got, ref.ref_entropy(probs, mask), rtol=RTOL)


def test_routing_entropy_known_values_and_zero_probs():
    np.testing.assert_allclose(
        losses.routing_entropy(jnp.full((3, 8), 0.125)), math.log(8), rtol=1e-6
    )
    onehot = jnp.asarray(np.eye(4, dtype=np.float32)[[0, 2, 3]])
    assert float(losses.routing_entropy(onehot)) == 0.0
    g = jax.grad(losses.routing_entropy)(onehot)
    assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------ sequence balance


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_balance_matches_reference(masked, score):
    b, length, e, k = 3, 10, 8, 2
    logits = np.random.default_rng(14).normal(size=(b * length, e)).astype(np.float32)
    bias = np.random.default_rng(15).normal(size=e) * 0.5
    # Routing selected WITH a bias: the loss must recompute the top-k on the unbiased probs.
    ids, _, probs = ref.ref_top_k(logits, k, score=score, bias=bias)
    r = _routing(ids, probs.astype(np.float32), logits)
    mask = _mask(b * length, 16) if masked else None
    got = losses.sequence_balance(
        r, num_experts=e, seq_len=length, token_mask=None if mask is None else jnp.asarray(mask)
    )
    want = ref.ref_sequence_balance(probs, k, e, length, token_mask=mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_sequence_balance_ignores_the_selection_bias():
    length, e, k = 8, 4, 1
    logits = np.random.default_rng(17).normal(size=(2 * length, e)).astype(np.float32)
    ids_biased, _, probs = ref.ref_top_k(logits, k, score="sigmoid", bias=[5.0, 0, 0, 0])
    ids_plain, _, _ = ref.ref_top_k(logits, k, score="sigmoid")
    assert (ids_biased != ids_plain).any()
    lb = losses.sequence_balance(_routing(ids_biased, probs, logits), num_experts=e, seq_len=length)
    lp = losses.sequence_balance(_routing(ids_plain, probs, logits), num_experts=e, seq_len=length)
    np.testing.assert_allclose(lb, lp, rtol=1e-6)


def test_sequence_balance_perfect_balance_is_one_and_per_sequence():
    e, k, length = 4, 2, 4
    # Uniform probs would tie; use probs where each token prefers a distinct pair, rotating.
    base = np.array([0.4, 0.3, 0.2, 0.1])
    probs = np.stack([np.roll(base, i) for i in range(length)])  # balanced within the sequence
    ids, _, _ = ref.ref_top_k(np.log(probs), k)
    r = _routing(ids, probs)
    # f_i = E/(kL) * count_i = 1 for every i; P_i = 0.25 -> sum = 1
    np.testing.assert_allclose(
        losses.sequence_balance(r, num_experts=e, seq_len=length), 1.0, rtol=1e-6
    )
    # The same 4 tokens regrouped as 2 sequences of 2 are imbalanced per sequence, although the
    # batch as a whole is balanced: the loss is > 1.
    two = losses.sequence_balance(r, num_experts=e, seq_len=2)
    np.testing.assert_allclose(two, ref.ref_sequence_balance(probs, k, e, 2), rtol=1e-6)
    assert float(two) > 1.05


def test_sequence_balance_leaves_all_padding_sequences_out():
    length, e, k = 5, 4, 2
    logits = np.random.default_rng(21).normal(size=(3 * length, e)).astype(np.float32)
    ids, _, probs = ref.ref_top_k(logits, k)
    r = _routing(ids, probs, logits)
    mask = np.ones(3 * length, bool)
    mask[length : 2 * length] = False  # the middle sequence is all padding
    got = losses.sequence_balance(r, num_experts=e, seq_len=length, token_mask=jnp.asarray(mask))
    keep = np.r_[0:length, 2 * length : 3 * length]
    r_kept = _routing(ids[keep], probs[keep], logits[keep])
    want = losses.sequence_balance(r_kept, num_experts=e, seq_len=length)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, ref.ref_sequence_balance(probs, k, e, length, mask), rtol=1e-6)


def test_losses_of_zero_tokens_are_zero():
    r = _routing(np.zeros((0, 2), int), np.zeros((0, 4)))
    for seq_len in (0, 3):  # a [1, 0, D] or a [0, 3, D] input
        assert float(losses.sequence_balance(r, num_experts=4, seq_len=seq_len)) == 0.0
    assert float(losses.load_balance(r, num_experts=4)) == 0.0
    assert float(losses.router_z_loss(r.logits)) == 0.0
    assert float(losses.routing_entropy(r.probs)) == 0.0


def test_sequence_balance_rejects_ragged_sequences():
    r = _routing(np.zeros((6, 1), int), np.full((6, 2), 0.5))
    with pytest.raises(ValueError, match="seq_len=4"):
        losses.sequence_balance(r, num_experts=2, seq_len=4)


# ---------------------------------------------------------------------------------- bias update


def test_update_bias_sign_rule_exact():
    bias = jnp.asarray([0.5, -0.25, 0.0, 1.0, 0.0], jnp.float32)
    counts = jnp.asarray([10, 2, 4, 0, 4], jnp.float32)  # mean 4
    rate = 0.125  # a power of two keeps the arithmetic exact
    got = losses.update_bias(bias, counts, rate)
    np.testing.assert_array_equal(got, [0.5 - 0.125, -0.25 + 0.125, 0.0, 1.0 + 0.125, 0.0])
    assert got.dtype == jnp.float32
    # all equal -> unchanged; rate 0 -> unchanged
    np.testing.assert_array_equal(losses.update_bias(bias, jnp.full((5,), 3.0), rate), bias)
    np.testing.assert_array_equal(losses.update_bias(bias, counts, 0.0), bias)
    # integer counts work
    np.testing.assert_array_equal(
        losses.update_bias(bias, jnp.asarray([10, 2, 4, 0, 4]), rate), got
    )


def _imbalance(counts):
    counts = np.asarray(counts)
    return float(counts.max() / counts.mean())


def test_update_bias_balances_a_skewed_router():
    """Auxiliary-loss-free balancing (docs/algorithms.md) fixes a router skewed to experts 0/1."""
    t, d, e, k, rate, steps = 512, 16, 8, 2, 0.01, 200
    rng = np.random.default_rng(0)
    x = rng.normal(size=(t, d)).astype(np.float32)
    x[:, -1] = 1.0  # a constant feature, so the kernel can carry a per-expert logit offset
    kernel = 0.5 * rng.normal(size=(d, e)).astype(np.float32)
    kernel[-1, :2] += 3.0  # big column bias toward experts 0 and 1
    logits = jnp.asarray(x @ kernel)

    @jax.jit
    def step(b):
        r = routing.top_k(logits, k, score="sigmoid", bias=b)
        counts = losses.expert_counts(r.expert_ids, r.valid, e)
        return losses.update_bias(b, counts, rate), counts

    b = jnp.zeros((e,), jnp.float32)
    history = []
    for _ in range(steps):
        b, counts = step(b)
        history.append(np.asarray(counts))
    initial = _imbalance(history[0])
    final = max(_imbalance(c) for c in history[-20:])  # worst of the last 20 steps
    # Measured (seeds 0-3): initial 2.8-3.3, worst of the last 20 steps 1.09-1.26, balanced
    # within ~20 steps; a sign error or a no-op update leaves it near the initial value.
    assert initial > 2.5  # the router really is skewed (perfect collapse onto 2 experts = 4)
    assert final < 0.5 * initial and final < 1.3, (initial, final)
    # The bias pushed the overloaded experts below all the others.
    assert float(b[:2].max()) < min(0.0, float(b[2:].min()))
    # Every selection still sums to k per token and the weights stay unbiased sigmoid scores.
    r = routing.top_k(logits, k, score="sigmoid", bias=b)
    np.testing.assert_allclose(
        r.weights,
        np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)), np.asarray(r.expert_ids), -1),
        rtol=1e-6,
    )
