"""`jmoe.convert.to_hf`: export then import is bit-identical (one file, shards, scanned
layout), and transformers loads the export with the reference logits."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from test_from_hf import FAMILIES, TOL, fixture

from jmoe.convert import CheckpointError, from_hf, to_hf
from jmoe.moe.routers import TopK


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(family, tmp_path):
    path, _ = fixture(family)
    config, variables = from_hf(path)
    assert to_hf(config, variables, tmp_path) == family
    assert (tmp_path / "model.safetensors").exists()
    config2, variables2 = from_hf(tmp_path)
    assert config2 == config
    assert_identical(variables2, variables)


def test_sharded_and_scanned_round_trip(tmp_path):
    path, _ = fixture("qwen2_moe")
    config, variables = from_hf(path, scan_layers=True, dtype="bfloat16")
    to_hf(config, variables, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    config2, variables2 = from_hf(tmp_path, scan_layers=True)
    assert config2 == config
    assert_identical(variables2, variables)


def test_a_config_no_family_fits_is_refused(tmp_path):
    path, _ = fixture("mixtral")
    config, variables = from_hf(path)
    moe = dataclasses.replace(config.moe, router=TopK(k=2, score="sigmoid"))
    config = dataclasses.replace(config, moe=moe)
    with pytest.raises(CheckpointError, match="fits none of"):
        to_hf(config, variables, tmp_path)
    with pytest.raises(CheckpointError, match="does not fit model_type='mixtral'"):
        to_hf(config, variables, tmp_path, model_type="mixtral")


def test_a_trained_selection_bias_is_not_dropped_silently(tmp_path):
    path, _ = fixture("mixtral")
    config, variables = from_hf(path)
    state = jax.tree.map(lambda b: b + 0.5, variables["moe_state"])
    with pytest.raises(CheckpointError, match="moe_state/layers_0/moe/bias is non-zero"):
        to_hf(config, {**variables, "moe_state": state}, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_export(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, ref = fixture(family)
    config, variables = from_hf(path)
    to_hf(config, variables, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = model(torch.tensor(ref["input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, ref["logits"], atol=TOL)
