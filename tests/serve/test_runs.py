"""jmoe.serve.runs: a train.py run directory's newest weights, config, tokenizer and chat
template, and what an incomplete one lacks."""

import json
import shutil

import jax
import numpy as np
import pytest

from jmoe.serve.runs import load_chat_template, load_run, missing_parts
from jmoe.train.tokenizer import ByteTokenizer


def test_load_run_restores_the_saved_params_and_moe_state(run):
    directory, config, state = run
    loaded = load_run(directory)
    assert loaded.name == "tiny-run" and loaded.step == 3 and loaded.config == config
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.chat_template is None
    for name, saved in (("params", state.params), ("moe_state", state.moe_state)):
        got = loaded.variables[name]
        assert jax.tree.structure(got) == jax.tree.structure(saved)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_parts_are_all_named(run, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(run[0], directory)
    assert missing_parts(directory) == []
    (directory / "config.yaml").unlink()
    shutil.rmtree(directory / "checkpoints" / "3")
    missing = missing_parts(directory)
    assert len(missing) == 2 and "config.yaml" in missing[0] and "checkpoint" in missing[1]
    with pytest.raises(FileNotFoundError, match="config.yaml .*checkpoint"):
        load_run(directory)


@pytest.mark.parametrize(
    "content, want",
    [
        ({"chat_template": "{{ messages }}"}, "{{ messages }}"),
        ({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default",
                                                                    "template": "d"}]}, "d"),
        ({"chat_template": ""}, None),
        ({"model_max_length": 8}, None),
    ],
)  # fmt: skip
def test_chat_template_from_the_tokenizer_config(tmp_path, content, want):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(content))
    assert load_chat_template(tmp_path) == want
