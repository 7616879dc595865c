"""jmoe.MoEConfig: validation errors that name the field and value, and the capacity rule."""

import dataclasses
import math
import re

import pytest

import jmoe
from jmoe.moe.config import MoEConfig


def test_defaults_are_plain_top2_softmax_dropless_swiglu():
    cfg = MoEConfig()
    assert cfg.router == jmoe.TopK(k=2, score="softmax", normalize=True)
    assert cfg.activation == "swiglu"
    assert cfg.capacity_factor is None and cfg.capacity(1024, deterministic=False) is None
    assert cfg.router.n_groups is None and cfg.router.top_groups is None
    assert cfg.shared_width == 0


def test_config_is_frozen_and_hashable():
    cfg = MoEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.router.k = 3  # type: ignore[misc]
    assert hash(cfg) == hash(MoEConfig())
    assert dataclasses.replace(cfg, router=jmoe.TopK(k=3)).router.k == 3


def _raises(field: str, value, **kwargs):
    """MoEConfig(**kwargs) raises a ValueError naming `field` and `value`."""
    with pytest.raises(ValueError) as info:
        MoEConfig(**kwargs)
    msg = str(info.value)
    assert field in msg, msg
    assert repr(value) in msg or str(value) in msg, msg
    return msg


@pytest.mark.parametrize(
    "field,value,kwargs",
    [
        ("TopK.k", 9, dict(num_experts=8, router=jmoe.TopK(k=9))),
        ("num_experts", 0, dict(num_experts=0, router=jmoe.TopK(k=1))),
        ("d_model", 0, dict(d_model=0)),
        ("d_ff", -4, dict(d_ff=-4)),
        ("router", "hash", dict(router="hash")),
        ("activation", "silu", dict(activation="silu")),
        ("lb_normalization", "hf", dict(lb_normalization="hf")),
        ("capacity_rounding", "up", dict(capacity_rounding="up")),
        ("implementation", "cuda", dict(implementation="cuda")),
        ("dtype", "float8", dict(dtype="float8")),
        ("n_groups", 3, dict(num_experts=8, router=jmoe.TopK(n_groups=3, top_groups=1))),
        ("top_groups", 5, dict(num_experts=8, router=jmoe.TopK(n_groups=4, top_groups=5))),
        ("top_groups", 0, dict(num_experts=8, router=jmoe.TopK(n_groups=4, top_groups=0))),
        ("n_groups", 4, dict(num_experts=8, router=jmoe.TopK(n_groups=4))),
        ("top_groups", 2, dict(num_experts=8, router=jmoe.TopK(top_groups=2))),
        ("k=4", 4, dict(num_experts=8, router=jmoe.TopK(k=4, n_groups=4, top_groups=1))),
        ("capacity_factor", -1.0, dict(capacity_factor=-1.0)),
        ("capacity_factor", 0.0, dict(capacity_factor=0.0)),
        ("eval_capacity_factor", -2.0, dict(eval_capacity_factor=-2.0)),
        ("min_capacity", -1, dict(min_capacity=-1)),
        ("num_shared", -1, dict(num_shared=-1)),
        ("shared_gate", True, dict(shared_gate=True)),
        ("lb_coef", -0.01, dict(lb_coef=-0.01)),
        ("z_loss_coef", -1e-3, dict(z_loss_coef=-1e-3)),
        ("TopP.max_k", 9, dict(num_experts=8, router=jmoe.TopP(max_k=9))),
        ("NullExperts.k", 7, dict(num_experts=4, router=jmoe.NullExperts(num_null=2, k=7))),
        ("target_active_experts", 5.0, dict(router=jmoe.TopP(max_k=2, target_active_experts=5.0))),
        (
            "capacity_factor",
            1.0,
            dict(capacity_factor=1.0, router=jmoe.ExpertChoice(allow_noncausal=True)),
        ),
        ("router_jitter", 1.5, dict(router_jitter=1.5)),
    ],
)
def test_bad_values_name_field_and_value(field, value, kwargs):
    _raises(field, value, **kwargs)


def test_unknown_choice_lists_allowed_values():
    msg = _raises("activation", "silu", activation="silu")
    assert all(a in msg for a in ("swiglu", "gelu", "relu"))


def test_good_values_construct():
    MoEConfig(num_experts=8, router=jmoe.TopK(k=8))
    MoEConfig(num_experts=16, router=jmoe.TopK(k=4, n_groups=4, top_groups=2, score="sigmoid"))
    MoEConfig(num_shared=1, shared_gate=True)
    MoEConfig(d_ff_shared=64, shared_gate=True)
    MoEConfig(capacity_factor=1.25, eval_capacity_factor=2.0, capacity_rounding="floor")
    for a in ("swiglu", "gelu", "relu"):
        MoEConfig(activation=a)


# ---------------------------------------------------------------------------------- capacity


def _cap(cf, e, k, **kw):
    return dict(capacity_factor=cf, num_experts=e, router=jmoe.TopK(k=k), **kw)


NO_K = dict(capacity_includes_k=False)


@pytest.mark.parametrize(
    "kwargs,tokens,want",
    [
        # Megatron default: ceil(CF * k * T / E)
        (_cap(1.25, 8, 2), 64, 20),  # 20.0 exactly
        (_cap(1.25, 8, 2), 100, 32),  # 31.25 -> 32
        (_cap(1.0, 8, 2), 20, 5),  # 5.0
        (_cap(1.0, 4, 1), 6, 2),  # 1.5 -> 2
        # floor / round, MTF / flaxformer parity (no k)
        (_cap(1.25, 8, 2, capacity_rounding="floor", **NO_K), 100, 15),  # 15.625 -> 15
        (_cap(1.25, 8, 2, capacity_rounding="round", **NO_K), 100, 16),  # 15.625 -> 16
        (_cap(1.25, 8, 2, capacity_rounding="round", **NO_K), 84, 13),  # 13.125 -> 13
        (_cap(1.25, 8, 2, **NO_K), 100, 16),
        (_cap(1.25, 8, 2, capacity_rounding="floor"), 100, 31),
        # min_capacity
        (_cap(1.0, 8, 1, min_capacity=4), 16, 4),  # 2 -> 4
        (_cap(1.0, 8, 1, min_capacity=4), 64, 8),  # 8 > 4
        (_cap(0.5, 8, 1, capacity_rounding="floor", min_capacity=1), 8, 1),  # 0 -> 1
        (_cap(0.5, 8, 1, capacity_rounding="floor"), 8, 0),
    ],
)
def test_capacity_values(kwargs, tokens, want):
    cap = MoEConfig(**kwargs).capacity(tokens, deterministic=False)
    assert cap == want and isinstance(cap, int)


def test_capacity_follows_the_formula_on_a_grid():
    """Exact rational arithmetic: C = rounding(CF * k' * T / E), k' = k or 1, then max(., min)."""
    for cf_num, cf_den in ((5, 4), (2, 1), (3, 2), (1, 1)):
        for t in (1, 7, 64, 100, 333):
            for e, k in ((8, 2), (4, 1), (6, 3)):
                for includes_k in (True, False):
                    kk = k if includes_k else 1
                    num, den = cf_num * kk * t, cf_den * e
                    exact = {"ceil": -(-num // den), "floor": num // den}
                    for rounding, value in exact.items():
                        cfg = MoEConfig(
                            num_experts=e,
                            capacity_factor=cf_num / cf_den,
                            capacity_includes_k=includes_k,
                            capacity_rounding=rounding,
                            min_capacity=2,
                            router=jmoe.TopK(k=k),
                        )
                        assert cfg.capacity(t, False) == max(value, 2), (
                            cf_num,
                            t,
                            e,
                            k,
                            includes_k,
                            rounding,
                        )


def test_eval_capacity_factor_applies_when_deterministic():
    cfg = MoEConfig(
        capacity_factor=1.25, eval_capacity_factor=2.0, num_experts=8, router=jmoe.TopK(k=2)
    )
    assert cfg.capacity(64, deterministic=False) == 20
    assert cfg.capacity(64, deterministic=True) == 32
    cfg = MoEConfig(capacity_factor=1.25, num_experts=8, router=jmoe.TopK(k=2))
    assert cfg.capacity(64, deterministic=True) == 20  # defaults to the training factor
    assert math.isclose(cfg.capacity_factor, 1.25)


def test_shared_width():
    assert MoEConfig(num_shared=2, d_ff=64).shared_width == 128
    assert MoEConfig(num_shared=2, d_ff=64, d_ff_shared=96).shared_width == 96


def test_error_message_format_is_stable():
    """`MoEConfig.<field>=<value>` appears verbatim, so a user can grep their config for it."""
    with pytest.raises(ValueError, match=re.escape("MoEConfig.router: TopK.k=9")):
        MoEConfig(num_experts=8, router=jmoe.TopK(k=9))


def test_capacity_is_exact_where_float_arithmetic_is_not():
    # 1.1 * 100 / 10 is 11.000000000000002 in floats; the capacity is 11, not 12.
    cfg = MoEConfig(num_experts=10, capacity_factor=1.1, router=jmoe.TopK(k=1))
    assert cfg.capacity(100, deterministic=False) == 11


def test_a_router_has_only_its_own_fields():
    """Settings another router would ignore cannot be written (they were silent before)."""
    with pytest.raises(TypeError, match="score"):
        jmoe.NullExperts(num_null=2, score="sigmoid")
    with pytest.raises(TypeError, match="n_groups"):
        jmoe.TopP(n_groups=2, top_groups=1)
    with pytest.raises(TypeError, match="bias_update_rate"):
        jmoe.ExpertChoice(allow_noncausal=True, bias_update_rate=1e-3)
