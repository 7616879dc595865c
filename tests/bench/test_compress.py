"""bench/compress.py: every method of the registry gives an ordinary model of the expert count
its name promises, and the table compares each with "none"."""

import pathlib
import sys

import numpy as np
from prune_cases import E, tiny_model

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import compress  # noqa: E402

from jmoe.compress import surgery  # noqa: E402
from jmoe.compress.router_stats import RouterStats  # noqa: E402
from jmoe.train.tokenizer import ByteTokenizer  # noqa: E402


def test_every_method_returns_a_model_of_the_promised_size():
    config, variables, tokens = tiny_model()
    rng = np.random.default_rng(0)
    stats = RouterStats(
        layers=(0, 1),
        frequency=rng.random((2, E)),
        mean_weight=rng.random((2, E)),
        tcess=rng.random((2, E)),
        null_frequency=np.zeros(2),
        num_tokens=32,
        confidence=0.1,
        top_k=2,
    )
    context = compress.Context(
        stats, np.asarray(tokens), np.ones(tokens.shape, bool), ByteTokenizer(), None
    )
    assert "none" in compress.METHODS
    for name, method in compress.METHODS.items():
        new_config, new_variables = method(config, variables, context)
        # "prune_tcess_0.5+int8": the expert fraction ends the first step's name
        first = name.split("+")[0]
        plain = first == "none" or first.startswith("quantize_")
        fraction = 1.0 if plain else float(first.rsplit("_", 1)[1])
        assert new_config.moe.num_experts == max(round(fraction * E), 1)
        kept_share = new_config.moe.num_experts / E
        new_bytes = surgery.expert_param_bytes(new_config, new_variables)
        float_bytes = surgery.expert_param_bytes(config, variables) * kept_share
        if new_config.moe.expert_quantization is not None:  # 1-byte weights and their scales
            assert new_bytes < 0.35 * float_bytes
        else:
            assert new_bytes == float_bytes


def test_the_table_compares_each_method_with_none():
    rows = {
        "none": {"experts_per_layer": 8, "expert_bytes": 8e6, "eval_loss": 4.0, "task_loss": 3.0},
        "prune_tcess_0.5": {
            "experts_per_layer": 4,
            "expert_bytes": 4e6,
            "eval_loss": 4.25,
            "task_loss": 3.5,
        },
    }
    table = compress.markdown_table({"methods": rows, "calibration": {"set": "email"}})
    assert "| email held-out loss |" in table
    assert "| prune_tcess_0.5 | 4 | 4.000 | 0.50 | 4.2500 | +0.2500 | 3.5000 | +0.5000 |" in table
