"""jmoe.trainer: one step per router and per preset (shrunk), the optimizer's decay mask and
schedule, the non-finite guard, and whole runs: the loss falls below the unigram baseline,
an interrupted and resumed run reproduces the uninterrupted one exactly, NaN stops the run."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmoe.lm.model import Transformer
from jmoe.train import trainer
from jmoe.train.report import read_metrics
from jmoe.train.run_config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
PRESETS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))

# Tiny shapes for any preset; routing features (score, groups, null experts, top-p, chains,
# shared experts, bias balancing, first dense layers, qk-norm, scan, remat, bf16) are kept.
TINY = [
    "model.vocab_size=64",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.head_dim=8",
    "model.d_ff=32",
    "model.max_seq_len=16",
    "model.moe.d_ff=16",
    "data.seq_len=16",
    "data.batch_size=2",
    "train.warmup_steps=0",
]


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
    peak = cfg.train.learning_rate
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(peak / 2)
    assert float(lr(10)) == pytest.approx(peak)
    assert float(lr(100)) == pytest.approx(peak * cfg.train.final_lr_fraction)
    assert float(lr(55)) < float(lr(30))


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


# Whole runs on a small real text (a standard-library module's source), byte tokenizer.
RUN = TINY + [
    "model.d_model=32",
    "model.n_layers=2",
    "model.moe.d_ff=32",
    "model.vocab_size=257",
    "data.tokenizer=byte",
    "data.max_bytes=null",
    "data.eval_fraction=0.1",
    "data.batch_size=4",
    "data.prefetch=1",
    "train.learning_rate=1e-2",
    "train.warmup_steps=5",
    "train.log_every=1",
    "train.eval_batches=4",
    "train.progress=false",
    "train.plot=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import json.decoder as module

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    with open(module.__file__) as f:
        path.write_text(f.read())
    return str(path)


def _run(corpus, workdir, extra=()):
    cfg = load_config(None, [*RUN, f"data.source={corpus}", *extra])
    return trainer.train_and_evaluate(cfg, workdir)


def _losses(workdir):
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_loss_falls_below_unigram_and_writes_the_run_directory(corpus, tmp_path):
    final = _run(corpus, tmp_path, ["train.steps=60", "train.eval_every=30", "train.plot=true"])
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 60 and final["step"] == 60
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    assert final["eval_loss"] < final["unigram_loss"], final
    assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]))
    for name in ("config.yaml", "metrics.jsonl", "report.png", "tokenizer", "checkpoints"):
        assert os.path.exists(tmp_path / name), name
    record = read_metrics(tmp_path / "metrics.jsonl")[-2]
    assert np.asarray(record["tokens_per_expert"]).shape == (2, 8)
    assert len(record["router_entropy"]) == 2 and record["mfu"] > 0


def test_interrupted_run_resumes_exactly(corpus, tmp_path, monkeypatch):
    steps = ["train.steps=8", "train.checkpoint_every=4", "train.eval_every=8"]
    full = _run(corpus, tmp_path / "full", steps)

    make_iterator = trainer.data.make_iterator

    class KilledAfter5Batches:  # the process dies while step 6 waits for its batch
        def __init__(self, iterator):
            self.iterator, self.batches = iterator, 0

        def __next__(self):
            self.batches += 1
            if self.batches == 6:
                raise KeyboardInterrupt
            return next(self.iterator)

        def get_state(self):
            return self.iterator.get_state()

    def make_killed(*args, shuffle=True, **kwargs):
        iterator = make_iterator(*args, shuffle=shuffle, **kwargs)
        return KilledAfter5Batches(iterator) if shuffle else iterator

    monkeypatch.setattr(trainer.data, "make_iterator", make_killed)
    with pytest.raises(KeyboardInterrupt):
        _run(corpus, tmp_path / "resumed", steps)
    monkeypatch.undo()
    assert [s for s, _ in _losses(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    resumed = _run(corpus, tmp_path / "resumed", steps)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    assert resumed["eval_loss"] == full["eval_loss"]

    with pytest.raises(ValueError, match=r"model.moe.router.k.*new workdir"):
        _run(corpus, tmp_path / "resumed", [*steps, "model.moe.router.k=1"])


def test_nan_guard_stops_after_max_bad_steps_keeping_last_good_checkpoint(corpus, tmp_path):
    extra = [
        "train.steps=20",
        "train.learning_rate=1e30",
        "train.warmup_steps=0",
        "train.grad_clip=null",
        "train.max_bad_steps=3",
        "train.checkpoint_every=1",
    ]
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        _run(corpus, tmp_path, extra)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    bad = [(r["step"], r["bad_steps"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    first_bad = min(step for step, count in bad if count)
    assert bad[-3:] == [(first_bad, 1), (first_bad + 1, 2), (first_bad + 2, 3)]
    assert saved[-1] == first_bad - 1  # the last good step's checkpoint is kept
