"""`CheckpointError` names the file, tensor or config field that cannot be converted."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_from_hf import fixture

from jmoe.convert import SUPPORTED_MODEL_TYPES, CheckpointError, from_hf, to_hf


@pytest.fixture
def copy(tmp_path):
    """A writable copy of a fixture, with helpers to edit its config and tensors."""

    class Copy:
        def __init__(self, family="mixtral"):
            self.path = tmp_path / family
            shutil.copytree(fixture(family)[0], self.path)

        def config(self, **changes):
            file = self.path / "config.json"
            fields = {**json.loads(file.read_text()), **changes}
            file.write_text(json.dumps({k: v for k, v in fields.items() if v is not ...}))

        def tensors(self, edit):
            file = self.path / "model.safetensors"
            tensors = load_file(file)
            edit(tensors)
            save_file(tensors, file)

    return Copy


def test_unsupported_model_type_lists_the_supported_ones(copy):
    c = copy()
    c.config(model_type="llama")
    with pytest.raises(CheckpointError, match="model_type='llama'") as e:
        from_hf(c.path)
    assert all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)


def test_missing_files(copy, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        from_hf(tmp_path / "nowhere")
    c = copy()
    (c.path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        from_hf(c.path)
    (c.path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing file .*config.json"):
        from_hf(c.path)


def test_missing_shard_named(copy, tmp_path):
    c = copy()
    config, variables = from_hf(c.path)
    out = tmp_path / "sharded"
    to_hf(config, variables, out, max_shard_bytes=30_000)
    (out / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00007.safetensors.*listed in"):
        from_hf(out)


def test_missing_tensor_named(copy):
    c = copy()
    c.tensors(lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.self_attn.k_pro"):
        from_hf(c.path)


def test_misshapen_tensor_names_both_shapes(copy):
    c = copy()
    c.tensors(lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(CheckpointError) as e:
        from_hf(c.path)
    assert "'model.norm.weight' in 'model.safetensors' has shape (31,), expected (32,)" in str(
        e.value
    )


def test_leftover_tensors_named(copy):
    c = copy()
    c.tensors(lambda t: t.update({"model.layers.0.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) not used .*extra.weight"):
        from_hf(c.path)


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("mixtral", {"sliding_window": 4}, "sliding_window=4"),
        (
            "mixtral",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type='dynamic'",
        ),
        ("mixtral", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ("mixtral", {"attention_logit_softcap": 30.0}, "attention_logit_softcap=30.0"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
        ("qwen3_moe", {"layer_types": ["sliding_attention"] * 3}, "layer_types="),
    ],
)
def test_config_fields_that_change_the_math_are_named(copy, family, changes, message):
    c = copy(family)
    c.config(**changes)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_hf(c.path)


def test_corrupt_files_named(copy):
    c = copy()
    weights = c.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        from_hf(c.path)
    (c.path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        from_hf(c.path)
