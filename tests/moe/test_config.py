"""jmoe.MoEConfig: validation errors that name the field and value, and the capacity rule."""

import dataclasses
import math
import re

import pytest

from jmoe.moe.config import MoEConfig


def test_defaults_are_plain_top2_softmax_dropless_swiglu():
    cfg = MoEConfig()
    assert (cfg.router, cfg.top_k, cfg.score, cfg.activation) == ("top_k", 2, "softmax", "swiglu")
    assert cfg.capacity_factor is None and cfg.capacity(1024, deterministic=False) is None
    assert cfg.n_groups is None and cfg.top_groups is None
    assert cfg.shared_width == 0


def test_config_is_frozen_and_hashable():
    cfg = MoEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    assert hash(cfg) == hash(MoEConfig())
    assert dataclasses.replace(cfg, top_k=3).top_k == 3


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
        ("top_k", 9, dict(num_experts=8, top_k=9)),
        ("top_k", 0, dict(top_k=0)),
        ("num_experts", 0, dict(num_experts=0, top_k=1)),
        ("d_model", 0, dict(d_model=0)),
        ("d_ff", -4, dict(d_ff=-4)),
        ("score", "softplus", dict(score="softplus")),
        ("router", "hash", dict(router="hash")),
        ("activation", "silu", dict(activation="silu")),
        ("lb_normalization", "hf", dict(lb_normalization="hf")),
        ("capacity_rounding", "up", dict(capacity_rounding="up")),
        ("implementation", "cuda", dict(implementation="cuda")),
        ("dtype", "float8", dict(dtype="float8")),
        ("n_groups", 3, dict(num_experts=8, n_groups=3, top_groups=1)),
        ("top_groups", 5, dict(num_experts=8, n_groups=4, top_groups=5)),
        ("top_groups", 0, dict(num_experts=8, n_groups=4, top_groups=0)),
        ("n_groups", 4, dict(num_experts=8, n_groups=4)),
        ("top_groups", 2, dict(num_experts=8, top_groups=2)),
        ("top_k", 4, dict(num_experts=8, top_k=4, n_groups=4, top_groups=1)),  # 2 eligible
        ("capacity_factor", -1.0, dict(capacity_factor=-1.0)),
        ("capacity_factor", 0.0, dict(capacity_factor=0.0)),
        ("eval_capacity_factor", -2.0, dict(eval_capacity_factor=-2.0)),
        ("min_capacity", -1, dict(min_capacity=-1)),
        ("num_shared", -1, dict(num_shared=-1)),
        ("shared_gate", True, dict(shared_gate=True)),
        ("lb_coef", -0.01, dict(lb_coef=-0.01)),
        ("z_loss_coef", -1e-3, dict(z_loss_coef=-1e-3)),
        ("bias_update_rate", -1e-3, dict(bias_update_rate=-1e-3)),
        ("router_jitter", 1.5, dict(router_jitter=1.5)),
    ],
)
def test_bad_values_name_field_and_value(field, value, kwargs):
    _raises(field, value, **kwargs)


def test_unknown_choice_lists_allowed_values():
    msg = _raises("score", "softplus", score="softplus")
    assert "softmax" in msg and "sigmoid" in msg
    msg = _raises("activation", "silu", activation="silu")
    assert all(a in msg for a in ("swiglu", "gelu", "relu"))


def test_good_values_construct():
    MoEConfig(num_experts=8, top_k=8)
    MoEConfig(num_experts=16, top_k=4, n_groups=4, top_groups=2, score="sigmoid")
    MoEConfig(num_shared=1, shared_gate=True)
    MoEConfig(d_ff_shared=64, shared_gate=True)
    MoEConfig(capacity_factor=1.25, eval_capacity_factor=2.0, capacity_rounding="floor")
    for a in ("swiglu", "gelu", "relu"):
        MoEConfig(activation=a)


# ---------------------------------------------------------------------------------- capacity


@pytest.mark.parametrize(
    "kwargs,tokens,want",
    [
        # Megatron default: ceil(CF * k * T / E)
        (dict(capacity_factor=1.25, top_k=2, num_experts=8), 64, 20),  # 20.0 exactly
        (dict(capacity_factor=1.25, top_k=2, num_experts=8), 100, 32),  # 31.25 -> 32
        (dict(capacity_factor=1.0, top_k=2, num_experts=8), 20, 5),  # 5.0
        (dict(capacity_factor=1.0, top_k=1, num_experts=4), 6, 2),  # 1.5 -> 2
        # floor / round, MTF / flaxformer parity (no k)
        (
            dict(
                capacity_factor=1.25,
                top_k=2,
                num_experts=8,
                capacity_includes_k=False,
                capacity_rounding="floor",
            ),
            100,
            15,
        ),  # 15.625 -> 15
        (
            dict(
                capacity_factor=1.25,
                top_k=2,
                num_experts=8,
                capacity_includes_k=False,
                capacity_rounding="round",
            ),
            100,
            16,
        ),  # 15.625 -> 16
        (
            dict(
                capacity_factor=1.25,
                top_k=2,
                num_experts=8,
                capacity_includes_k=False,
                capacity_rounding="round",
            ),
            84,
            13,
        ),  # 13.125 -> 13
        (dict(capacity_factor=1.25, top_k=2, num_experts=8, capacity_includes_k=False), 100, 16),
        (dict(capacity_factor=1.25, top_k=2, num_experts=8, capacity_rounding="floor"), 100, 31),
        # min_capacity
        (dict(capacity_factor=1.0, top_k=1, num_experts=8, min_capacity=4), 16, 4),  # 2 -> 4
        (dict(capacity_factor=1.0, top_k=1, num_experts=8, min_capacity=4), 64, 8),  # 8 > 4
        (
            dict(
                capacity_factor=0.5,
                top_k=1,
                num_experts=8,
                capacity_rounding="floor",
                min_capacity=1,
            ),
            8,
            1,
        ),  # 0 -> 1
        (dict(capacity_factor=0.5, top_k=1, num_experts=8, capacity_rounding="floor"), 8, 0),
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
                            top_k=k,
                            capacity_factor=cf_num / cf_den,
                            capacity_includes_k=includes_k,
                            capacity_rounding=rounding,
                            min_capacity=2,
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
    cfg = MoEConfig(capacity_factor=1.25, eval_capacity_factor=2.0, top_k=2, num_experts=8)
    assert cfg.capacity(64, deterministic=False) == 20
    assert cfg.capacity(64, deterministic=True) == 32
    cfg = MoEConfig(capacity_factor=1.25, top_k=2, num_experts=8)
    assert cfg.capacity(64, deterministic=True) == 20  # defaults to the training factor
    assert math.isclose(cfg.capacity_factor, 1.25)


def test_shared_width():
    assert MoEConfig(num_shared=2, d_ff=64).shared_width == 128
    assert MoEConfig(num_shared=2, d_ff=64, d_ff_shared=96).shared_width == 96


def test_error_message_format_is_stable():
    """`MoEConfig.<field>=<value>` appears verbatim, so a user can grep their config for it."""
    with pytest.raises(ValueError, match=re.escape("top_k=9")):
        MoEConfig(num_experts=8, top_k=9)


def test_capacity_is_exact_where_float_arithmetic_is_not():
    # 1.1 * 100 / 10 is 11.000000000000002 in floats; the capacity is 11, not 12.
    cfg = MoEConfig(num_experts=10, top_k=1, capacity_factor=1.1)
    assert cfg.capacity(100, deterministic=False) == 11


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(router="null", num_null=2, score="sigmoid"), "score"),
        (dict(router="top_p", n_groups=2, top_groups=1), "n_groups"),
        (dict(router="null", num_null=2, bias_update_rate=1e-3), "bias_update_rate"),
        (
            dict(router="expert_choice", allow_noncausal=True, bias_update_rate=1e-3),
            "bias_update_rate",
        ),
    ],
)
def test_settings_a_router_would_ignore_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*router="):
        MoEConfig(**kwargs)


def test_expert_choice_capacity_uses_the_eval_factor_when_deterministic():
    cfg = MoEConfig(
        num_experts=4,
        router="expert_choice",
        allow_noncausal=True,
        capacity_factor=1.0,
        eval_capacity_factor=2.0,
    )
    assert cfg.expert_choice_capacity(16, deterministic=False) == 4
    assert cfg.expert_choice_capacity(16, deterministic=True) == 8
    assert (
        MoEConfig(
            num_experts=4, top_k=3, router="expert_choice", allow_noncausal=True
        ).expert_choice_capacity(16)
        == 12
    )
