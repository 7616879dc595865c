"""Quantized experts: the int8 / fp8 round trip against a NumPy reference, the grouped matmul and
expert MLP on quantized weights against float references (dequantised: tight; original: within
the derived error bound), no full-precision `[E, D, F]` in the XLA loop, and a quantized model's
logits and its refusals (training, Hugging Face export, bad config values)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jmoe import kernels
from jmoe.compress import surgery
from jmoe.compress.quantize import dequantize_experts, quantize_experts, quantize_method
from jmoe.kernels import registry
from jmoe.kernels.quantization import dequantize, quantize
from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe.config import MoEConfig
from jmoe.train.errors import UserError

IMPLS = ["xla", "ragged_dot"]


# ---------------------------------------------------------------- NumPy reference


def _np_quantize(w, kind):
    """The per-column symmetric scheme written out in NumPy (ml_dtypes for e4m3 rounding)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=-2)
    largest = np.float32(127.0 if kind == "int8" else 448.0)
    scale = np.where(amax > 0, amax / largest, np.float32(1.0)).astype(np.float32)
    ratio = w / scale[..., None, :]
    if kind == "int8":
        q = np.clip(np.rint(ratio), -127, 127).astype(np.float32)
    else:
        q = ratio.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q, scale


def _error_bound(w, scale, kind):
    """Largest `|w - q * scale|` per entry: half a step for int8; for e4m3 half an ulp, which is
    `2^-4 |w|` for normals (3 mantissa bits) and `2^-10 scale` below the smallest normal."""
    s = np.broadcast_to(np.asarray(scale)[..., None, :], np.shape(w))
    if kind == "int8":
        return s / 2
    return np.maximum(np.abs(w) * 2.0**-4, s * 2.0**-10)


def _weights(seed=0, shape=(4, 16, 8)):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    w[1, :, 2] = 0.0  # a zero column: scale 1, q 0
    w[2, 3, 5] = 40.0  # an outlier that sets its column's scale
    return w


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_round_trip_matches_numpy_and_stays_within_the_bound(kind):
    w = _weights()
    q, scale = quantize(w, kind)
    assert q.dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kind]
    assert scale.shape == (4, 8) and scale.dtype == jnp.float32
    q_ref, scale_ref = _np_quantize(w, kind)
    np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
    # the same rounding up to a tie decided differently by one float division
    step = 1.0 if kind == "int8" else np.abs(q_ref) * 2.0**-3 + 2.0**-9
    assert np.all(np.abs(np.asarray(q, np.float32) - q_ref) <= step)
    err = np.abs(w - np.asarray(dequantize(q, scale)))
    assert np.all(err <= _error_bound(w, scale_ref, kind) * (1 + 1e-5) + 1e-12)
    assert np.all(np.asarray(dequantize(q, scale))[1, :, 2] == 0.0)
    assert np.asarray(scale)[1, 2] == 1.0
    # a scanned stack's leading layer axis is one more group axis
    q2, scale2 = quantize(np.stack([w, 2 * w]), kind)
    np.testing.assert_array_equal(q2[0], q)
    np.testing.assert_allclose(scale2[1], _np_quantize(2 * w, kind)[1], rtol=1e-6)


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="int8"):
        quantize(_weights(), "int4")


# ---------------------------------------------------------------- kernels


def _rows(seed=1, m=30, d=16):
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


SIZES = np.array([7, 0, 12, 5], np.int32)  # an empty expert, and 6 rows past the groups


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_grouped_matmul_on_quantized_weights(impl, kind):
    x, w = _rows(), _weights()
    q, scale = quantize(w, kind)
    got = np.asarray(
        kernels.grouped_matmul(x, q, SIZES, scale_GxN=scale, implementation=impl), np.float64
    )
    deq = kernels.grouped_matmul(x, dequantize(q, scale), SIZES, implementation="xla")
    np.testing.assert_allclose(got, deq, rtol=1e-5, atol=1e-5)
    # against the original weights: |x @ (w - q s)| <= |x| @ bound, row by row
    ends = np.cumsum(SIZES)
    bound = _error_bound(w, np.asarray(scale), kind)
    for r in range(int(ends[-1])):
        g = int(np.searchsorted(ends, r, side="right"))
        want = x[r].astype(np.float64) @ w[g]
        assert np.all(np.abs(got[r] - want) <= np.abs(x[r]) @ bound[g] + 1e-4)
    assert np.all(got[ends[-1] :] == 0)


def _mlp_inputs(activation, kind, seed=2, g=4, d=16, f=8):
    rng = np.random.default_rng(seed)
    num_in = 2 if activation in kernels.GATED else 1
    w_in = tuple(rng.normal(size=(g, d, f)).astype(np.float32) * 0.3 for _ in range(num_in))
    w_down = rng.normal(size=(g, f, d)).astype(np.float32) * 0.3
    b_in = tuple(rng.normal(size=(g, f)).astype(np.float32) for _ in range(num_in))
    b_down = rng.normal(size=(g, d)).astype(np.float32)
    quantized = [quantize(w, kind) for w in (*w_in, w_down)]
    return w_in, w_down, b_in, b_down, quantized


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_expert_mlp_on_quantized_weights(impl, activation, kind):
    x = _rows()
    w_in, w_down, b_in, b_down, quantized = _mlp_inputs(activation, kind)
    (*q_in, q_down), (*s_in, s_down) = zip(*quantized, strict=True)
    biases = dict(b_in=b_in, b_down_GxD=b_down, activation=activation)
    got = kernels.expert_mlp(
        x, tuple(q_in), q_down, SIZES, scales_in=tuple(s_in), scale_down_GxD=s_down,
        implementation=impl, **biases,
    )  # fmt: skip
    deq = kernels.expert_mlp(
        x, tuple(dequantize(q, s) for q, s in zip(q_in, s_in, strict=True)),
        dequantize(q_down, s_down), SIZES, implementation="xla", **biases,
    )  # fmt: skip
    np.testing.assert_allclose(got, deq, rtol=1e-5, atol=1e-5)
    ends = np.cumsum(SIZES)
    assert np.all(np.asarray(got)[ends[-1] :] == 0)  # no bias reaches the unused rows
    if activation != "relu":
        return
    # relu is 1-Lipschitz, so with h = relu(x W_in + b) and e_in, e_down the entry bounds:
    # |y_q - y| <= (|x| e_in) |W_q,down| + |h| e_down
    for r in range(int(ends[-1])):
        g = int(np.searchsorted(ends, r, side="right"))
        h = np.maximum(x[r].astype(np.float64) @ w_in[0][g] + b_in[0][g], 0)
        want = h @ w_down[g] + b_down[g]
        e_in = _error_bound(w_in[0], np.asarray(s_in[0]), kind)[g]
        e_down = _error_bound(w_down, np.asarray(s_down), kind)[g]
        deq_down = np.asarray(dequantize(q_down, s_down))[g]
        bound = (np.abs(x[r]) @ e_in) @ np.abs(deq_down) + h @ e_down
        assert np.all(np.abs(np.asarray(got[r], np.float64) - want) <= bound + 1e-4)


def test_forced_pallas_runs_the_xla_twin_and_none_never_picks_pallas(monkeypatch):
    monkeypatch.setattr(registry, "PALLAS_DEFAULT_BACKENDS", (jax.default_backend(),))
    pallas = dataclasses.replace(registry.IMPLEMENTATIONS["pallas"], supports=lambda *a: True)
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "pallas", pallas)
    assert registry.resolve("expert_mlp", None).name == "pallas"
    assert registry.resolve("expert_mlp", None, quantized=True).name == "xla"
    assert registry.resolve("grouped_matmul", "pallas", quantized=True).name == "xla"
    x, w = _rows(), _weights()
    q, scale = quantize(w, "int8")
    got = kernels.grouped_matmul(x, q, SIZES, scale_GxN=scale, implementation="pallas")
    want = kernels.grouped_matmul(x, q, SIZES, scale_GxN=scale, implementation="xla")
    np.testing.assert_array_equal(got, want)


def test_missing_or_partial_scales_are_refused():
    x, w = _rows(), _weights()
    q, scale = quantize(w, "int8")
    with pytest.raises(ValueError, match="needs its column scales"):
        kernels.grouped_matmul(x, q, SIZES)
    with pytest.raises(ValueError, match="shape"):
        kernels.grouped_matmul(x, q, SIZES, scale_GxN=scale[:, :3])
    _, _, _, _, quantized = _mlp_inputs("swiglu", "int8")
    (*q_in, q_down), (*s_in, _) = zip(*quantized, strict=True)
    with pytest.raises(ValueError, match="needs its column scales"):
        kernels.expert_mlp(x, tuple(q_in), q_down, SIZES, scales_in=tuple(s_in))


def _float_avals(jaxpr):
    """Every float array value a jaxpr (and each jaxpr nested in it) creates, as (shape, dtype)."""
    out = []
    for eqn in jaxpr.eqns:
        out += [(v.aval.shape, v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _float_avals(inner)
    return [(s, d) for s, d in out if jnp.issubdtype(d, jnp.floating)]


def test_the_xla_loop_never_holds_full_precision_expert_weights():
    x = _rows()
    _, _, _, _, quantized = _mlp_inputs("swiglu", "int8")
    (*q_in, q_down), (*s_in, s_down) = zip(*quantized, strict=True)
    full = {tuple(q_in[0].shape), tuple(q_down.shape)}  # [E, D, F] and [E, F, D]

    def full_precision(fn):
        jaxpr = jax.make_jaxpr(fn)(x).jaxpr
        return [a for a in _float_avals(jaxpr) if tuple(a[0]) in full]

    def quantized_mlp(x):
        return kernels.expert_mlp(
            x, tuple(q_in), q_down, SIZES, scales_in=tuple(s_in), scale_down_GxD=s_down,
            implementation="xla",
        )  # fmt: skip

    def dequantized_mlp(x):  # the check's control: dequantising first does create them
        w_in = tuple(dequantize(q, s) for q, s in zip(q_in, s_in, strict=True))
        return kernels.expert_mlp(x, w_in, dequantize(q_down, s_down), SIZES, implementation="xla")

    assert full_precision(quantized_mlp) == []
    assert full_precision(dequantized_mlp) != []


def test_no_gradient_through_quantized_weights():
    x, w = _rows(), _weights()
    q, scale = quantize(w, "int8")

    def loss(x):
        return kernels.grouped_matmul(x, q, SIZES, scale_GxN=scale, implementation="xla").sum()

    with pytest.raises(NotImplementedError, match="expert_quantization"):
        jax.grad(loss)(x)


# ---------------------------------------------------------------- models


def _model(scan_layers=False, seed=1):
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, expert_bias=True)
    config = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, moe=moe, scan_layers=scan_layers
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
    return config, Transformer(config).init(jax.random.key(seed), tokens), tokens


def _logits(config, variables, tokens):
    return jax.jit(lambda v, t: Transformer(config).apply(v, t)[0])(variables, tokens)


@pytest.mark.parametrize(
    "kind, scan_layers, mean_error, outlier", [("int8", False, 0.02, 0.1), ("fp8", True, 0.08, 0.4)]
)
def test_quantized_model_logits_stay_close(kind, scan_layers, mean_error, outlier):
    config, variables, tokens = _model(scan_layers)
    q_config, q_vars = quantize_experts(config, variables, kind)
    assert q_config.moe.expert_quantization == kind
    # 1 byte a weight instead of 4, plus the float32 scales (1/K of the weights) and biases
    float_bytes = surgery.expert_param_bytes(config, variables)
    assert surgery.expert_param_bytes(q_config, q_vars) < 0.35 * float_bytes
    want, got = _logits(config, variables, tokens), _logits(q_config, q_vars, tokens)
    # 1. Exactly the float model on the dequantised weights (same routing, float rounding).
    deq = _logits(*dequantize_experts(q_config, q_vars), tokens)
    np.testing.assert_allclose(got, deq, atol=2e-4, rtol=1e-4)
    # 2. Close to the original: measured mean errors are about 0.8% (int8) and 3.5% (fp8) of the
    #    logits' spread (bounds: 2.5x that). A token whose top-k routing flips in the second layer
    #    may differ more, so at most 1 in 10 tokens has a logit off by over 5x the mean bound.
    err = np.abs(np.asarray(got - want)) / float(want.std())
    assert err.mean() < mean_error
    assert (err.max(-1) > outlier).mean() <= 0.1


def test_a_quantized_model_initializes_and_its_params_are_int8():
    config, variables, tokens = _model()
    q_config, _ = quantize_experts(config, variables, "int8")
    fresh = Transformer(q_config).init(jax.random.key(0), tokens)
    experts = fresh["params"]["layers_0"]["moe"]["experts"]
    assert experts["w_up"].dtype == jnp.int8 and experts["w_down_scale"].shape == (4, 32)
    assert experts["b_up"].dtype == jnp.float32
    assert np.all(np.isfinite(_logits(q_config, fresh, tokens)))


def test_training_quantization_and_export_refusals(tmp_path):
    from jmoe.convert import to_hf
    from jmoe.train.run_config import load_config
    from jmoe.train.trainer import make_optimizer, make_train_step

    config, variables, _ = _model()
    q_config, q_vars = quantize_method("fp8")(config, variables, None)
    with pytest.raises(UserError, match="expert_quantization='fp8'"):
        make_train_step(Transformer(q_config), make_optimizer(load_config().train))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(q_config, q_vars, "int8")
    with pytest.raises(ValueError, match="quantized"):
        to_hf(q_config, q_vars, tmp_path / "hf")
    with pytest.raises(ValueError, match="expert_quantization"):
        MoEConfig(expert_quantization="int4")
    loaded = load_config(None, ["model.moe.expert_quantization=int8"])
    assert loaded.model.moe.expert_quantization == "int8"
