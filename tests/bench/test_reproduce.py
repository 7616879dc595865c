"""bench/reproduce.py: a miniature of every experiment (a 1-layer model, a few steps, one seed)
writes a table whose numbers are finite and consistent with the routers."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests" / "train"))

import reproduce  # noqa: E402
from run_cases import write_corpus  # noqa: E402

# A miniature training run of every experiment (minutes of CPU): `pytest -m slow` runs it.
pytestmark = pytest.mark.slow

MINI = reproduce.Mode(
    "quick",
    (
        "model.vocab_size=257",
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.head_dim=8",
        "model.d_ff=32",
        "model.max_seq_len=16",
        "model.moe.d_ff=16",
        "data.tokenizer=byte",
        "data.eval_fraction=0.3",
        "data.seq_len=16",
        "data.batch_size=2",
        "data.prefetch=0",
        "train.steps=3",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=2",
    ),
    seeds=1,
)


# Fewer variants where the reading needs fewer: one pair each (fewer compilations).
KEEP = {"top_p": 2, "chain_of_experts": 2, "budget": 1}


@pytest.fixture(scope="module")
def mini_runs(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    mode = reproduce.Mode(MINI.name, (*MINI.overrides, f"data.source={corpus}"), MINI.seeds)
    runs, out = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("out")
    results = {}
    for name in reproduce.experiment_names():
        spec = reproduce.load_experiment(name)
        spec["seeds"] = {"quick": 1}
        keep = KEEP.get(name, len(spec["variants"]))  # what the reading compares
        spec["variants"] = dict(list(spec["variants"].items())[:keep])
        if "finetune" in spec:
            spec["finetune"]["steps"] = {"quick": 2}
        results[name] = reproduce.run_experiment(spec, mode, runs, out)
    return results, out, mode, runs


def test_every_experiment_writes_json_markdown_and_plot(mini_runs, tmp_path):
    results, out = mini_runs[:2]
    assert set(results) == {"adamoe", "budget", "chain_of_experts", "deepseek", "top_p"}
    for name, result in results.items():
        assert json.loads((out / f"{name}.json").read_text())["reading"] == result["reading"]
        lines = (out / f"{name}.md").read_text().splitlines()
        rows = sum(len(v) for v in result["phases"].values())
        assert sum(line.startswith("| ") for line in lines) == rows + 1  # header + variants
        assert (out / f"{name}.png").stat().st_size > 0
        assert result["reading"] and "nan" not in result["reading"]
        spec = reproduce.load_experiment(name)  # --render: the same files from the JSON alone
        spec["variants"] = dict(list(spec["variants"].items())[: KEEP.get(name, 99)])
        reproduce.render(json.loads((out / f"{name}.json").read_text()), spec, tmp_path)
        assert (tmp_path / f"{name}.md").read_text() == (out / f"{name}.md").read_text()


def test_numbers_are_finite_and_consistent_with_the_routers(mini_runs):
    results = mini_runs[0]
    for result in results.values():
        for variants in result["phases"].values():
            for name, row in variants.items():
                router, layers = row["router"], len(row["experts_per_layer"])
                chain = 2 if "C=2" in name else 1
                slots = router.get("k") or router.get("max_k") or 8
                assert math.isfinite(row["eval_loss"]["mean"]), name
                for value in row["experts_per_layer"]:
                    assert 0 <= value <= slots * chain, (name, value)
                hist = np.asarray(row["expert_count_hist"])
                assert len(hist) >= slots + 1 and hist.sum() > 0
                assert row["active_params"]["mean"] <= row["total_params"]["mean"]
                assert row["expert_flops_per_token"]["mean"] > 0
                if router["kind"] == "top_k":  # every token runs exactly k experts per pass
                    assert row["experts_per_layer"] == [router["k"] * chain] * layers
                    assert row["experts_per_token_std"]["mean"] == 0
                    assert row["loss_experts_spearman"]["mean"] is None


def test_fine_grained_experts_match_the_coarse_parameters_but_for_the_router():
    spec = reproduce.load_experiment("deepseek")
    (_, coarse), (_, fine) = list(spec["variants"].items())[:2]
    coarse_cfg = reproduce._config(reproduce.QUICK, spec, coarse, seed=0)
    fine_cfg = reproduce._config(reproduce.QUICK, spec, fine, seed=0)
    layers, d_model = coarse_cfg.model.n_layers, coarse_cfg.model.d_model
    coarse_n = reproduce.parameter_counts(coarse_cfg, np.full(layers, 2.0))
    fine_n = reproduce.parameter_counts(fine_cfg, np.full(layers, 7.0))
    router_extra = layers * d_model * (31 - 8)  # the only size difference: router columns
    assert fine_n["total_params"] - coarse_n["total_params"] == router_extra
    assert fine_n["active_params"] - coarse_n["active_params"] == pytest.approx(router_extra)
    # the coarse model's unused experts: 6 of 8 per layer, each 3 matrices of D x 256
    unused = layers * 6 * 3 * d_model * 256
    assert coarse_n["total_params"] - coarse_n["active_params"] == pytest.approx(unused)


def test_cached_only_tabulates_the_finished_runs_and_names_the_others(mini_runs, tmp_path):
    _, _, mode, runs = mini_runs
    spec = reproduce.load_experiment("chain_of_experts")  # the miniature ran its first pair
    spec["seeds"] = {"quick": 1}
    result = reproduce.run_experiment(spec, mode, runs, tmp_path, cached_only=True)
    names = list(spec["variants"])
    assert list(result["phases"]["scratch"]) == names[:2]
    assert result["not_run"] == {"scratch": sorted(names[2:])}
    assert f"{names[2]} not run" in result["reading"]
    assert "Not run (scratch" in (tmp_path / "chain_of_experts.md").read_text()
