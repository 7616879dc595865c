"""`model.init_from=DIR`: fine-tuning a Hugging Face checkpoint (the tiny Mixtral fixture). The
config comes from the checkpoint, overrides that change its math are refused, step 0 trains the
imported weights, and null experts can be added; the run resumes like any other."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import CHATML, FIXTURES, write_hf_checkpoint
from run_cases import run_cli, write_corpus
from safetensors.numpy import save_file

from jmoe.convert import from_hf
from jmoe.hf_tokenizer import PretrainedTokenizer
from jmoe.lm.model import Transformer
from jmoe.moe.routers import NullExperts, TopK, TopP
from jmoe.serve.runs import load_run
from jmoe.train import data, init_from
from jmoe.train.errors import UserError
from jmoe.train.run import train_and_evaluate
from jmoe.train.run_config import load_config
from jmoe.train.trainer import prepare_data

RUN = [
    "data.seq_len=16",
    "data.batch_size=2",
    "data.max_bytes=null",
    "data.eval_fraction=0.1",
    "data.prefetch=1",
    "train.learning_rate=1e-3",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_batches=1",
    "train.progress=false",
    "train.plot=false",
]
NULL_EXPERTS = [
    "model.moe.router=null_experts",
    "model.moe.router.num_null=4",
    "model.moe.router.k=4",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-mixtral")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _config(checkpoint, corpus, *overrides):
    return load_config(
        None, [f"model.init_from={checkpoint}", f"data.source={corpus}", *RUN, *overrides]
    )


def test_the_model_config_is_the_checkpoints(checkpoint, corpus):
    imported, _ = from_hf(checkpoint)
    config = _config(checkpoint, corpus, "model.remat=full", "model.d_model=32").model
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        assert getattr(config, field) == getattr(imported, field)
    assert config.moe.num_experts == 4 and config.moe.router == TopK(k=2, renorm_when_k1=True)
    assert config.remat == "full" and config.init_from == str(checkpoint)
    assert config.param_dtype == "float32"
    null = _config(checkpoint, corpus, *NULL_EXPERTS).model.moe.router
    assert null == NullExperts(num_null=4, k=4)
    assert isinstance(_config(checkpoint, corpus, "model.moe.router=top_p").model.moe.router, TopP)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.d_model=64", r"model.d_model=64 conflicts with model.init_from=.*gives 32"),
        ("model.moe.num_experts=8", "model.moe.num_experts=8 conflicts"),
        ("data.tokenizer=byte", "data.tokenizer is the checkpoint's"),
    ],
)
def test_overrides_that_change_the_checkpoint_are_refused(checkpoint, corpus, override, match):
    with pytest.raises(ValueError, match=match):
        _config(checkpoint, corpus, override)


def test_a_directory_that_is_not_a_checkpoint_is_named(tmp_path, corpus):
    with pytest.raises(UserError, match=r"model.init_from=.*(not a directory|config.json)"):
        _config(tmp_path / "nowhere", corpus)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="model.init_from=.*unsupported model_type='bert'"):
        _config(tmp_path, corpus)


def test_step_one_loss_is_the_imported_models_loss_on_the_first_batch(checkpoint, corpus, tmp_path):
    config = _config(checkpoint, corpus, "train.steps=1")
    final = train_and_evaluate(config, tmp_path / "run")
    tokenizer, train_docs, _ = prepare_data(config, tmp_path / "other", resume=False)
    assert isinstance(tokenizer, PretrainedTokenizer)  # the checkpoint's, special tokens too
    batch = next(
        data.make_iterator(train_docs, tokenizer, seq_len=16, batch_size=2, seed=config.data.seed)
    )
    imported, variables = from_hf(checkpoint)
    segments = jnp.asarray(batch["segment_ids"])  # each packed document attends to itself
    logits, _ = Transformer(imported).apply(
        variables, jnp.asarray(batch["inputs"]), segment_ids_BxS=segments
    )
    logits = np.asarray(logits)
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
    want = (nll * batch["mask"]).sum() / batch["mask"].sum()
    assert final["loss"] == pytest.approx(want, rel=1e-5)


def test_null_experts_fine_tune_and_resume(checkpoint, corpus, tmp_path, monkeypatch):
    workdir = tmp_path / "adamoe"
    config = _config(checkpoint, corpus, *NULL_EXPERTS, "train.steps=2")
    first = train_and_evaluate(config, workdir)
    assert np.isfinite(first["loss"]) and np.isfinite(first["eval_loss"])
    run = load_run(workdir)  # a fine-tuned run serves with the checkpoint's tokenizer
    kernel = run.variables["params"]["layers_0"]["moe"]["router"]["kernel"]
    assert kernel.shape == (32, 4 + 4) and run.chat_template == CHATML
    assert isinstance(run.tokenizer, PretrainedTokenizer) and len(run.tokenizer.eos_ids) == 2

    def no_import(*args, **kwargs):
        raise AssertionError("a resumed run reads its own checkpoint, not model.init_from")

    monkeypatch.setattr(init_from, "initial_variables", no_import)
    resumed = train_and_evaluate(
        _config(checkpoint, corpus, *NULL_EXPERTS, "train.steps=3"), workdir
    )
    assert resumed["step"] == 3 and np.isfinite(resumed["loss"])
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]


def test_null_expert_router_columns_copy_the_imported_ones(checkpoint, corpus):
    model = _config(checkpoint, corpus, *NULL_EXPERTS).model
    initial = init_from.initial_variables(model)
    _, imported = from_hf(checkpoint)
    for i in range(model.n_layers):
        got = np.asarray(initial["params"][f"layers_{i}"]["moe"]["router"]["kernel"])
        want = np.asarray(imported["params"][f"layers_{i}"]["moe"]["router"]["kernel"])
        np.testing.assert_array_equal(got, np.concatenate([want, want], axis=-1))
    assert "moe_state" not in initial  # a new routing rule starts from its own state


def test_the_checkpoints_moe_state_stays_while_the_router_kind_does():
    deepseek = FIXTURES / "deepseek_v3"
    overrides = [f"model.init_from={deepseek}", "model.moe.router.bias_update_rate=1e-3"]
    model = load_config(None, [*overrides, "data.seq_len=16"]).model
    assert model.moe.router.bias_update_rate == 1e-3 and model.mla is not None
    initial = init_from.initial_variables(model)
    _, imported = from_hf(deepseek)
    got, want = initial["moe_state"], imported["moe_state"]
    assert jax.tree.structure(got) == jax.tree.structure(want) and jax.tree.leaves(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.any(np.asarray(b) != 0)  # the checkpoint's selection bias, not a fresh zero


def test_train_py_names_a_bad_checkpoint_and_a_refused_override(checkpoint, tmp_path):
    workdir = ("--workdir", str(tmp_path / "run"))
    out = run_cli(*workdir, f"model.init_from={tmp_path / 'nowhere'}")
    assert out.returncode == 2 and "model.init_from=" in out.stderr
    out = run_cli(*workdir, f"model.init_from={checkpoint}", "model.n_layers=9")
    assert out.returncode == 2 and "model.n_layers=9 conflicts" in out.stderr
    assert "Traceback" not in out.stderr
