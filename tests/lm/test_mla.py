"""jmoe.lm.mla against the head-by-head NumPy reference of tests/mla_reference.py; its cached
(absorbed) decoding against its full forward, alone and inside the `Transformer`."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_check import assert_decode_matches_forward
from mla_reference import ref_mla

from jmoe.lm.config import ModelConfig
from jmoe.lm.flops import flops_per_token
from jmoe.lm.mla import MLA, MLAConfig
from jmoe.lm.model import Transformer, init_cache
from jmoe.lm.param_layout import stack_layers
from jmoe.lm.rope import YarnScaling
from jmoe.moe.config import MoEConfig

B, S, D, H, THETA, EPS = 2, 6, 16, 4, 100.0, 1e-6
MLA_SHAPES = {
    "direct_q": MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5),
    "low_rank_q": MLAConfig(8, 4, 6, 5, q_lora_rank=12),
}
# A short "pretraining context" so the YaRN ramp falls inside the rotated width; both mscales
# nonzero so the rotated features and the softmax are scaled.
YARN = YarnScaling(4.0, 32, beta_fast=4.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5)
REF_YARN = dict(
    factor=4.0,
    length=32,
    beta_fast=4.0,
    beta_slow=1.0,
    magnitude=(0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1),
    softmax=(0.05 * math.log(4) + 1) ** 2,
)


def _module(mla: MLAConfig, scaling=None) -> MLA:
    return MLA(mla, H, THETA, scaling, EPS)


def _params(module, seed=0):
    """NumPy-filled params: kernels N(0, 0.3^2), norm scales around 1."""
    rng = np.random.default_rng(seed)
    x = np.zeros((B, S, D), np.float32)
    positions = np.zeros((B, S), np.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, positions)["params"]

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.3 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(module, params, *args):
    return jax.tree.map(np.asarray, jax.jit(module.apply)({"params": params}, *args))


@pytest.mark.parametrize("shape", MLA_SHAPES)
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_full_forward_matches_reference(shape, yarn):
    mla = MLA_SHAPES[shape]
    module = _module(mla, YARN if yarn else None)
    params = _params(module)
    n, p, r, w = 4, 6, 8, 5
    want_shapes = {"kv_a": (D, r + p), "kv_b": (r, H, n + w), "o": (H, w, D)}
    if mla.q_lora_rank is None:
        want_shapes["q"] = (D, H, n + p)
    else:
        want_shapes.update(q_a=(D, 12), q_b=(12, H, n + p))
    assert {k: v["kernel"].shape for k, v in params.items() if "kernel" in v} == want_shapes
    norms = {"kv_a_norm": (r,)} | ({"q_a_norm": (12,)} if mla.q_lora_rank else {})
    assert {k: v["scale"].shape for k, v in params.items() if "scale" in v} == norms
    x = np.random.default_rng(1).standard_normal((B, S, D)).astype(np.float32)
    positions = np.array([np.arange(S), np.arange(S) + 20])  # row 1 starts late (YaRN matters)
    out, cache = _apply(module, params, x, positions)
    assert cache is None and out.shape == (B, S, D)
    for b in range(B):
        want, _, _ = ref_mla(
            params, x[b], positions[b], mla, H, THETA, EPS, REF_YARN if yarn else None
        )
        np.testing.assert_allclose(out[b], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", MLA_SHAPES)
def test_cached_absorbed_decode_equals_full_forward(shape):
    """Right-padded prompts of lengths 3 and 1, then one token at a time with the rows at
    different positions: every output equals the full forward of that row, and the cache holds
    exactly the normalised latents and rotated shared keys."""
    mla = MLA_SHAPES[shape]
    module = _module(mla, YARN)
    params = _params(module, seed=2)
    m, lengths, steps = 10, np.array([3, 1]), 4
    x = np.random.default_rng(3).standard_normal((B, 3 + steps, D)).astype(np.float32)
    rows = [np.concatenate([x[b, : lengths[b]], x[b, 3:]]) for b in range(B)]
    full = [_apply(module, params, row[None], np.arange(len(row))[None])[0][0] for row in rows]
    cache = {"latent": jnp.zeros((B, m, 8)), "k_rope": jnp.zeros((B, m, 6))}
    out, cache = _apply(module, params, x[:, :3], np.broadcast_to(np.arange(3), (B, 3)), cache)
    assert {k: v.shape for k, v in cache.items()} == {"latent": (B, m, 8), "k_rope": (B, m, 6)}
    for b in range(B):
        np.testing.assert_allclose(out[b, : lengths[b]], full[b][: lengths[b]], atol=1e-5)
    position = lengths.copy()
    for t in range(steps):
        out, cache = _apply(module, params, x[:, 3 + t][:, None], position[:, None], cache)
        for b in range(B):
            np.testing.assert_allclose(out[b, 0], full[b][position[b]], atol=1e-5)
        position += 1
    for b in range(B):
        n = lengths[b] + steps
        _, latent, k_rope = ref_mla(params, rows[b], np.arange(n), mla, H, THETA, EPS, REF_YARN)
        np.testing.assert_allclose(cache["latent"][b, :n], latent, atol=1e-5)
        np.testing.assert_allclose(cache["k_rope"][b, :n], k_rope, atol=1e-5)


def test_cached_decode_never_expands_keys_or_values():
    """No value in the cached step has a per-position, per-head shape `[B, M, H, *]`: keys and
    values are never rebuilt from the latent cache."""
    module = _module(MLA_SHAPES["low_rank_q"])
    params = _params(module)
    m = 16
    cache = {"latent": jnp.zeros((B, m, 8)), "k_rope": jnp.zeros((B, m, 6))}
    step = jax.make_jaxpr(module.apply)(
        {"params": params}, jnp.zeros((B, 1, D)), jnp.zeros((B, 1), jnp.int32), cache
    )
    full = jax.make_jaxpr(module.apply)(
        {"params": params}, jnp.zeros((B, m, D)), jnp.zeros((B, m), jnp.int32)
    )

    def shapes(jaxpr):
        return {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}

    expanded = {(B, m, H, 4 + 5), (B, m, H, 4), (B, m, H, 5)}
    assert expanded & shapes(full.jaxpr)  # the check can see an expansion
    assert not expanded & shapes(step.jaxpr)


def _model_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=32,
        d_model=D,
        n_layers=3,
        n_heads=H,
        d_ff=24,
        max_seq_len=16,
        first_dense_layers=1,
        mla=MLA_SHAPES["low_rank_q"],
        rope_scaling=YARN,
        moe=MoEConfig(d_ff=8, num_experts=4),
    )
    return ModelConfig(**{**base, **overrides})


def _model_variables(cfg, seed=0):
    tokens = np.zeros((B, S), np.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "moe_state" in name:
            return 0.05 * noise
        return 1.0 + 0.1 * noise if "scale" in name else 0.25 * noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_transformer_decode_matches_forward(scan):
    """`Transformer.decode` with the latent cache (rows at different positions) equals the full
    forward, in both layer layouts."""
    cfg = _model_config()
    variables = _model_variables(cfg)
    assert set(variables["params"]["layers_1"]["attn"]) == {
        "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o"
    }  # fmt: skip
    tokens = np.random.default_rng(4).integers(0, 32, (B, 8)).astype(np.int32)
    full_logits = np.asarray(
        jax.jit(lambda v, t: Transformer(cfg).apply(v, t)[0])(variables, tokens)
    )
    if scan:
        variables = {k: stack_layers(cfg, v) for k, v in variables.items()}
        cfg = dataclasses.replace(cfg, scan_layers=True)
    cache = init_cache(cfg, B, 12)
    assert {k: v.shape for k, v in cache.items()} == {
        "latent": (3, B, 12, 8),
        "k_rope": (3, B, 12, 6),
    }
    assert_decode_matches_forward(cfg, variables, tokens, full_logits, cache)


def test_flops_per_token_counts_mla_projections():
    cfg = _model_config(moe_every=0, first_dense_layers=0, n_layers=2)
    d, h, v, s = D, H, 32, 10
    q, r, n, p, w = 4 + 6, 8, 4, 6, 5
    attention = (d * 12 + 12 * h * q) + d * (r + p) + r * h * (n + w) + h * w * d
    weights = 2 * attention + 2 * 3 * d * 24 + d * v
    assert flops_per_token(cfg, s) == 6 * weights + 12 * 2 * h * (q + w) / 2 * s


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(qk_rope_head_dim=5), "MLAConfig.qk_rope_head_dim=5 is invalid: must be an even"),
        (dict(qk_rope_head_dim=0), "MLAConfig.qk_rope_head_dim=0"),
        (dict(kv_lora_rank=0), "MLAConfig.kv_lora_rank=0 is invalid: must be an integer >= 1"),
        (dict(qk_nope_head_dim=-1), "MLAConfig.qk_nope_head_dim=-1"),
        (dict(v_head_dim=2.5), "MLAConfig.v_head_dim=2.5"),
        (dict(q_lora_rank=0), "MLAConfig.q_lora_rank=0 is invalid: must be None"),
    ],
)
def test_config_errors(fields, fragment):
    base = dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)
    with pytest.raises(ValueError, match=fragment):
        MLAConfig(**{**base, **fields})


def test_model_config_checks_with_mla():
    with pytest.raises(ValueError, match="ModelConfig.qk_norm=True is invalid: must be False with"):
        _model_config(qk_norm=True)
    with pytest.raises(
        ValueError, match="ModelConfig.qkv_bias=True is invalid: must be False with"
    ):
        _model_config(qkv_bias=True)
    assert _model_config(d_model=18).mla is not None  # heads need not divide d_model


def test_model_config_refuses_plain_dicts_for_sections():
    with pytest.raises(ValueError, match="ModelConfig.mla=.* must be None or a MLAConfig"):
        _model_config(mla={"kv_lora_rank": 8})
    with pytest.raises(ValueError, match="ModelConfig.rope_scaling=.* must be None or a Yarn"):
        _model_config(rope_scaling={"factor": 4.0})
