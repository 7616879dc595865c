"""jmoe.train.trainer: one step per router and per preset (shrunk), the optimizer's decay mask
and schedule (kept past its end), the non-finite guard (loss, gradient and updated weights)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_cases import TINY

from jmoe.lm.model import Transformer
from jmoe.train import trainer
from jmoe.train.run_config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
PRESETS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))


def _shrunk(path=None, extra=()):
    cfg = load_config(path)
    overrides = list(TINY)
    if cfg.model.n_kv_heads is not None:
        overrides.append("model.n_kv_heads=1")
    if cfg.model.first_dense_layers:
        overrides += ["model.first_dense_layers=1", "model.n_layers=2"]
    moe = cfg.model.moe
    if moe.num_experts > 16:
        overrides.append("model.moe.num_experts=16")
    if moe.d_ff_shared is not None:
        overrides.append("model.moe.d_ff_shared=16")
    return load_config(path, overrides + list(extra))


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, s = cfg.data.batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, size=(b, s + 1), dtype=np.int32)
    mask = np.ones((b, s), bool)
    mask[0, -3:] = False  # some padding
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def _state(cfg, model, tx):
    """A TrainState with NumPy-filled parameters of the model's shapes (no compiled init)."""
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
    rng = np.random.default_rng(0)

    def fill(s):
        return jnp.asarray(rng.normal(scale=0.1, size=s.shape), s.dtype)

    params = jax.tree.map(fill, shapes["params"])
    moe_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get("moe_state", {}))
    return trainer.TrainState(
        params=params,
        opt_state=tx.init(params),
        moe_state=moe_state,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(1),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def _one_step(cfg):
    model = Transformer(cfg.model)
    tx = trainer.make_optimizer(cfg.train)
    state = _state(cfg, model, tx)
    new, metrics = jax.jit(trainer.make_train_step(model, tx))(state, _batch(cfg))
    return state, new, metrics


def _assert_stepped(cfg, state, new, metrics):
    assert int(new.step) == 1 and int(new.bad_steps) == 0
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["total_loss"]) >= float(metrics["loss"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
    assert all(jax.tree.leaves(changed)), changed
    n_moe = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
    assert np.asarray(metrics["active_experts"]).shape == (n_moe,)


# The presets cover top_k (tiny), null (adamoe), top_p, chains and sigmoid / group-limited /
# shared / bias-balanced top_k (deepseek_v3_style); these add the remaining routing options.
ROUTERS = {
    "expert_choice": ["model.moe.router=expert_choice", "model.moe.router.allow_noncausal=true"],
    "shared_gate+capacity+jitter": [
        "model.moe.num_shared=1",
        "model.moe.shared_gate=true",
        "model.moe.capacity_factor=1.0",
        "model.moe.router_jitter=0.1",
        "model.moe_every=2",
        "model.n_layers=2",
    ],
}


@pytest.mark.parametrize("router", ROUTERS)
def test_one_step_each_router(router):
    cfg = _shrunk(extra=ROUTERS[router])
    _assert_stepped(cfg, *_one_step(cfg))


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_one_step_each_preset_shrunk(path):
    cfg = _shrunk(path)
    state, new, metrics = _one_step(cfg)
    _assert_stepped(cfg, state, new, metrics)
    moe = cfg.model.moe
    bias_moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.moe_state, new.moe_state)
    updates = getattr(moe.router, "bias_update_rate", 0) > 0
    updates |= getattr(moe.router, "target_active_experts", None) is not None
    assert any(jax.tree.leaves(bias_moved)) == updates


def test_one_step_with_mla_and_yarn():
    """Multi-head latent attention with a low-rank query and YaRN RoPE, set from overrides:
    the step is finite and moves every parameter (the gradient reaches each one)."""
    cfg = _shrunk(
        extra=[
            "model.mla={kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 4, v_head_dim: 6}",
            "model.mla.q_lora_rank=12",
            "model.rope_scaling={factor: 4, original_max_position_embeddings: 8}",
            "model.rope_scaling.mscale_all_dim=1.0",
        ]
    )
    state, new, metrics = _one_step(cfg)
    assert set(state.params["layers_0"]["attn"]) == {
        "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o"
    }  # fmt: skip
    _assert_stepped(cfg, state, new, metrics)


def test_decay_mask_skips_norms_and_biases():
    cfg = _shrunk(extra=["model.qkv_bias=true", "model.qk_norm=true"])
    params = _state(cfg, Transformer(cfg.model), optax.identity()).params
    flat = {
        "/".join(str(k.key) for k in path): decays
        for path, decays in jax.tree_util.tree_leaves_with_path(trainer.decay_mask(params))
    }
    assert any("bias" in name for name in flat) and any("norm" in name for name in flat)
    for name, decays in flat.items():
        leaf_is_vector = "norm" in name or "bias" in name
        assert decays == (not leaf_is_vector), name
    assert flat["embed/embedding"] and flat["layers_0/moe/router/kernel"]


def test_learning_rate_warms_up_then_decays_to_final_fraction():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10"])
    lr = trainer.learning_rate_schedule(cfg.train)
    peak, final = cfg.train.learning_rate, cfg.train.learning_rate * cfg.train.final_lr_fraction
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(peak / 2)
    assert float(lr(10)) == pytest.approx(peak)
    assert float(lr(100)) == pytest.approx(final)
    assert float(lr(55)) < float(lr(30))
    # cosine: halfway through the decay the rate is halfway between peak and final
    assert float(lr(55)) == pytest.approx((peak + final) / 2)


def test_schedule_keeps_its_end_when_train_steps_grows():
    started = load_config(None, ["train.steps=100", "train.warmup_steps=10"]).train
    longer = load_config(None, ["train.steps=300", "train.warmup_steps=10"]).train
    kept = trainer.learning_rate_schedule(longer, decay_steps=100)
    original = trainer.learning_rate_schedule(started)
    for step in (0, 5, 10, 55, 99, 100):
        assert float(kept(step)) == float(original(step))
    for step in (101, 200, 299):
        assert float(kept(step)) == pytest.approx(float(original(100)))
    assert trainer.schedule_end(longer, 100) == 100 and trainer.schedule_end(longer) == 300
    warmup_longer = load_config(None, ["train.steps=5", "train.warmup_steps=10"]).train
    assert trainer.schedule_end(warmup_longer) == 11


def test_non_finite_step_is_skipped_and_counted():
    cfg = _shrunk()
    model = Transformer(cfg.model)
    tx = trainer.make_optimizer(cfg.train)
    state = _state(cfg, model, tx)
    step = jax.jit(trainer.make_train_step(model, tx))
    poisoned = state.replace(
        params={
            **state.params,
            "final_norm": {"scale": state.params["final_norm"]["scale"] * jnp.nan},
        }
    )
    after, metrics = step(poisoned, _batch(cfg))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1 and int(after.bad_steps) == 1
    for got, want in zip(
        jax.tree.leaves((after.params, after.opt_state, after.moe_state)),
        jax.tree.leaves((poisoned.params, poisoned.opt_state, poisoned.moe_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    twice, _ = step(after, _batch(cfg))
    assert int(twice.bad_steps) == 2
    healed, _ = step(state.replace(bad_steps=twice.bad_steps), _batch(cfg))
    assert int(healed.bad_steps) == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 is Inf in float32
def test_step_whose_updated_weights_overflow_is_skipped():
    """A finite loss and gradient with a step size past float32's range give Inf weights: the
    guard keeps the old ones."""
    cfg = _shrunk(extra=["train.learning_rate=1e39", "train.grad_clip=null"])
    model = Transformer(cfg.model)
    tx = trainer.make_optimizer(cfg.train)
    state = _state(cfg, model, tx)
    after, metrics = jax.jit(trainer.make_train_step(model, tx))(state, _batch(cfg))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(after.bad_steps) == 1
    for got, want in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(metrics["param_norm"]) == pytest.approx(float(optax.tree.norm(state.params)))
