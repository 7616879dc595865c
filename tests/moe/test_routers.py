"""Router objects: their own fields and checks, slots, state, `route` against the pure routing
functions, serialisation, and a new router registered without touching the MoE layer."""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.moe import routers, routing

E = 6


def _logits(t=10, e=E, seed=0):
    return jax.random.normal(jax.random.key(seed), (t, e))


@pytest.mark.parametrize(
    "router, field, value",
    [
        (lambda: jmoe.TopK(k=0), "TopK.k", 0),
        (lambda: jmoe.TopK(score="softplus"), "TopK.score", "softplus"),
        (lambda: jmoe.TopK(bias_update_rate=-1.0), "TopK.bias_update_rate", -1.0),
        (lambda: jmoe.TopK(seq_balance_coef=-1.0), "TopK.seq_balance_coef", -1.0),
        (lambda: jmoe.NullExperts(num_null=0), "NullExperts.num_null", 0),
        (lambda: jmoe.NullExperts(num_null=2, null_balance="x"), "NullExperts.null_balance", "x"),
        (lambda: jmoe.NullExperts(num_null=2, budget_rate=-1), "NullExperts.budget_rate", -1),
        (lambda: jmoe.TopP(p=0.0), "TopP.p", 0.0),
        (lambda: jmoe.TopP(p=1.5), "TopP.p", 1.5),
        (lambda: jmoe.TopP(boundary="loose"), "TopP.boundary", "loose"),
        (lambda: jmoe.TopP(max_k=0), "TopP.max_k", 0),
        (lambda: jmoe.ExpertChoice(), "ExpertChoice.allow_noncausal", False),
        (lambda: jmoe.ExpertChoice(allow_noncausal=True, capacity_factor=0), "capacity_factor", 0),
    ],
)
def test_bad_fields_name_the_router_field_and_value(router, field, value):
    with pytest.raises(ValueError) as info:
        router()
    msg = str(info.value)
    assert f"{field}={value!r}" in msg, msg


def test_layer_checks_name_the_layer_limits():
    with pytest.raises(ValueError, match=r"MoEConfig.router: TopK.k=5 .*num_experts=4"):
        jmoe.MoEConfig(num_experts=4, router=jmoe.TopK(k=5))
    with pytest.raises(ValueError, match=r"n_groups=3 must divide num_experts=8"):
        jmoe.MoEConfig(num_experts=8, router=jmoe.TopK(n_groups=3, top_groups=1))
    with pytest.raises(ValueError, match=r"target_active_experts=4.5 .*\(0, 4\]"):
        jmoe.MoEConfig(
            num_experts=4,
            chain_steps=2,
            router=jmoe.NullExperts(num_null=2, k=2, target_active_experts=4.5),
        )
    with pytest.raises(ValueError, match=r"MoEConfig.router='top_p' is invalid"):
        jmoe.MoEConfig(router="top_p")


def test_slots_outputs_and_expected_compute():
    cases = [
        (jmoe.TopK(k=3), 3, E, 6.0),
        (jmoe.NullExperts(num_null=4, k=3), 3, E + 4, 6.0),
        (jmoe.NullExperts(num_null=4, k=3, target_active_experts=1.5), 3, E + 4, 1.5),
        (jmoe.TopP(), E, E, 2.0 * E),
        (jmoe.TopP(max_k=2), 2, E, 4.0),
        (jmoe.ExpertChoice(capacity_factor=1.5, allow_noncausal=True), E, E, 3.0),
    ]
    for router, slots, outputs, active_over_two_steps in cases:
        assert router.slots(E) == slots, router
        assert router.num_outputs(E) == outputs, router
        assert router.expected_active(E, 2) == active_over_two_steps, router


def test_state_variables_follow_the_router():
    assert jax.tree.map(jnp.shape, jmoe.TopK().init_state(E, 1)) == {"bias": (E,)}
    assert jax.tree.map(jnp.shape, jmoe.TopK().init_state(E, 3)) == {"bias": (3, E)}
    assert jmoe.NullExperts(num_null=2).init_state(E, 1) == {}
    budgeted = jmoe.TopP(target_active_experts=2.0).init_state(E, 2)
    assert jax.tree.map(jnp.shape, budgeted) == {"budget": ()}
    assert jmoe.ExpertChoice(allow_noncausal=True).init_state(E, 1) == {}


def test_update_state_applies_each_routers_rule():
    load_E = jnp.array([4.0, 1.0, 2.0, 1.0, 0.0, 4.0])
    stats = {"tokens_per_expert": load_E, "active_experts": jnp.asarray(2.5)}
    bias = jmoe.TopK(bias_update_rate=0.1).update_state({"bias": jnp.zeros(E)}, stats)["bias"]
    np.testing.assert_allclose(bias, 0.1 * np.sign(load_E.mean() - load_E))
    fixed = jmoe.TopK().update_state({"bias": jnp.ones(E)}, stats)
    np.testing.assert_array_equal(fixed["bias"], jnp.ones(E))
    router = jmoe.TopP(target_active_experts=2.0, budget_rate=0.2)
    budget = router.update_state({"budget": jnp.asarray(0.5)}, stats)["budget"]
    np.testing.assert_allclose(budget, 0.5 + 0.2 * (2.5 - 2.0))


def test_route_equals_the_routing_functions():
    logits = _logits()
    bias = jnp.linspace(-0.5, 0.5, E)
    got = jmoe.TopK(k=2, score="sigmoid", scale=2.0).route(logits, {"bias": bias})
    want = routing.top_k(logits, 2, score="sigmoid", normalize=True, scale=2.0, bias=bias)
    np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
    np.testing.assert_allclose(got.weights, want.weights)
    null_logits = _logits(e=E + 3)
    got = jmoe.NullExperts(num_null=3, k=3).route(null_logits, {"budget": jnp.asarray(0.7)})
    want = routing.null_experts(null_logits, 3, num_null=3, null_offset=0.7)
    np.testing.assert_array_equal(got.expert_ids, want.expert_ids)
    got = jmoe.TopP(p=0.5, target_active_experts=2.0).route(logits, {"budget": jnp.asarray(0.2)})
    want = routing.top_p(logits, 0.3)
    np.testing.assert_array_equal(got.valid, want.valid)
    got = jmoe.TopP(p=0.5).route(logits, {})
    np.testing.assert_array_equal(got.valid, routing.top_p(logits, 0.5).valid)
    got = jmoe.ExpertChoice(capacity_factor=1.2, allow_noncausal=True).route(logits, {})
    np.testing.assert_array_equal(got.valid, routing.expert_choice(logits, 2).valid)


def test_chain_step_selects_its_bias_row():
    logits = _logits()
    bias_CxE = jnp.stack([jnp.zeros(E), jnp.array([0.0, 0, 0, 0, 9, 9])])
    ids = jmoe.TopK(k=2).route(logits, {"bias": bias_CxE}, step=1).expert_ids
    assert set(np.asarray(ids).ravel()) == {4, 5}


def test_expert_choice_capacity_uses_the_eval_factor_when_deterministic():
    router = jmoe.ExpertChoice(capacity_factor=1.0, eval_capacity_factor=2.0, allow_noncausal=True)
    assert router.capacity(16, 4, deterministic=False) == 4
    assert router.capacity(16, 4, deterministic=True) == 8
    assert router.max_rows(16, 4, deterministic=True) == 32
    assert jmoe.ExpertChoice(capacity_factor=3.0, allow_noncausal=True).capacity(16, 4, True) == 12
    assert jmoe.ExpertChoice(capacity_factor=0.01, allow_noncausal=True).capacity(16, 4, True) == 1
    assert jmoe.ExpertChoice(capacity_factor=99.0, allow_noncausal=True).capacity(16, 4, True) == 16


@pytest.mark.parametrize(
    "router",
    [
        jmoe.TopK(k=8, score="sigmoid", n_groups=8, top_groups=4, bias_update_rate=1e-3),
        jmoe.NullExperts(num_null=8, k=4, target_active_experts=2.0),
        jmoe.TopP(p=0.3, max_k=4),
        jmoe.ExpertChoice(capacity_factor=1.0, allow_noncausal=True),
    ],
    ids=lambda r: r.kind,
)
def test_dict_round_trip(router):
    fields = routers.router_to_dict(router)
    assert fields["kind"] == router.kind
    assert routers.router_from_dict(fields) == router


def test_from_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'null_experts' needs 'num_null'"):
        routers.router_from_dict("null_experts")
    with pytest.raises(ValueError, match=r"router 'top_p' has no field 'k'"):
        routers.router_from_dict({"kind": "top_p", "k": 2})
    with pytest.raises(ValueError, match=r"'top2' is not one of \['expert_choice'"):
        routers.router_from_dict({"kind": "top2"})


@routers.register_router
@dataclasses.dataclass(frozen=True)
class FirstExperts(routers.Router):
    """A test router: every token goes to experts 0 .. k-1 with equal weights."""

    kind: typing.ClassVar[str] = "test_first_experts"
    k: int = 2

    def slots(self, num_experts):
        return self.k

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        t = logits_TxE.shape[0]
        ids = jnp.broadcast_to(jnp.arange(self.k, dtype=jnp.int32), (t, self.k))
        probs = jax.nn.softmax(logits_TxE, -1)
        weights = jnp.full((t, self.k), 1.0 / self.k)
        return routing.Routing(ids, weights, jnp.ones((t, self.k), bool), probs, logits_TxE)


def test_a_registered_router_runs_in_the_layer_and_the_config_loader():
    cfg = jmoe.MoEConfig(d_model=8, d_ff=16, num_experts=4, router=FirstExperts(k=2))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    variables = jmoe.MoE(cfg).init(jax.random.key(0), x)
    _, stats = jmoe.MoE(cfg).apply(variables, x)
    np.testing.assert_array_equal(stats["tokens_per_expert"], [6, 6, 0, 0])
    from jmoe.train.run_config import load_config

    loaded = load_config(None, ["model.moe.router=test_first_experts", "model.moe.router.k=3"])
    assert loaded.model.moe.router == FirstExperts(k=3)


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):

        @routers.register_router
        @dataclasses.dataclass(frozen=True)
        class Other(routers.Router):
            kind: typing.ClassVar[str] = "top_k"
