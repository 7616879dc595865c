"""jmoe.train.token_stats and fine-tuning runs: per-token held-out losses average to the run's
held-out loss and per-token expert counts to the layers' own statistic; `init_params` starts a
run from given weights (a top-k run converted for null experts) and refuses mismatched ones."""

import jax
import numpy as np
import pytest
from run_cases import RUN

from jmoe.moe.layer import with_null_experts
from jmoe.train import run, token_stats
from jmoe.train.errors import UserError
from jmoe.train.run_config import load_config

STEPS = ["train.steps=4", "train.eval_every=4"]
TOP_P = "model.moe.router={kind: top_p, p: 0.5}"
NULL = "model.moe.router={kind: null_experts, num_null: 4, k: 4}"


def _config(corpus, *extra):
    return load_config(None, [*RUN, f"data.source={corpus}", *STEPS, *extra])


@pytest.fixture(scope="module")
def top_p_run(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("top_p")
    return workdir, run.train_and_evaluate(_config(corpus, TOP_P), workdir)


def test_token_losses_average_to_the_held_out_loss_and_experts_to_the_layer_stat(top_p_run):
    workdir, final = top_p_run
    stats = token_stats.held_out_token_stats(workdir)
    n = len(stats.loss_N)
    assert stats.experts_LxN.shape == (2, n) and n > 0
    assert stats.loss_N.mean() == pytest.approx(final["eval_loss"], rel=1e-5)
    np.testing.assert_allclose(stats.experts_LxN.mean(1), stats.active_experts_L, rtol=1e-5)
    assert ((stats.experts_LxN >= 1) & (stats.experts_LxN <= 8)).all()  # top-p keeps >= 1
    assert np.ptp(stats.experts_LxN) > 0  # counts vary per token
    one = token_stats.held_out_token_stats(workdir, max_batches=1)
    np.testing.assert_allclose(one.loss_N, stats.loss_N[: len(one.loss_N)], rtol=1e-6)


def test_scanned_layers_are_refused_with_the_fix():
    from jmoe.lm.model import Transformer

    config = load_config(None, [*RUN, "model.scan_layers=true"])
    with pytest.raises(UserError, match="model.scan_layers=false"):
        token_stats.make_token_step(Transformer(config.model))


def test_init_params_starts_a_fine_tuning_run_from_converted_weights(corpus, top_p_run, tmp_path):
    source, _ = top_p_run
    _, state = run.load_state(source)
    params = {
        name: {**layer, "moe": with_null_experts(layer["moe"], 4)} if "moe" in layer else layer
        for name, layer in state.params.items()
    }
    # One step at the warmup's learning rate 0: the weights are exactly the given ones.
    run.train_and_evaluate(
        _config(corpus, NULL, "train.steps=1"), tmp_path / "ft", init_params=params
    )
    _, tuned = run.load_state(tmp_path / "ft")
    jax.tree.map(np.testing.assert_array_equal, tuned.params, params)
    with pytest.raises(UserError, match=r"init_params\['layers_0'\]\['moe'\]\['router'\]"):
        run.train_and_evaluate(_config(corpus, NULL), tmp_path / "bad", init_params=state.params)
