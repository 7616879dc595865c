"""serve.py --quantize: the served experts are int8 / fp8, the printed completion is the
quantized engine's, and `/v1/models` reports the quantization."""

import subprocess

import httpx
import numpy as np
from conftest import LiveServer
from test_cli import _env, _serve

from jmoe.serve.app import create_app
from jmoe.serve.engine import Engine


def test_quantize_flag_serves_quantized_experts(run):
    engine = Engine.from_run(run[0], quantize="int8", num_slots=2)
    experts = engine.steps.variables["params"]["layers_0"]["moe"]["experts"]
    assert experts["w_up"].dtype == "int8" and "w_up_scale" in experts
    out = subprocess.run(
        _serve("--run", run[0], "--quantize", "int8", "--prompt", "def f(", "--max-tokens", 5),
        capture_output=True, text=True, timeout=600, env=_env(), check=True,
    )  # fmt: skip
    assert out.stdout == engine.generate("def f(", max_tokens=5)[0].text + "\n"
    live = LiveServer(create_app(engine))
    try:
        [card] = httpx.get(f"{live.url}/v1/models", timeout=30).json()["data"]
    finally:
        live.stop()
    assert card["expert_quantization"] == "int8"
    bad = subprocess.run(
        _serve("--run", run[0], "--quantize", "int4"), capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "--quantize" in bad.stderr and "int8" in bad.stderr


def test_from_hf_quantizes_the_imported_experts(tmp_path):
    from hf_fixtures import write_hf_checkpoint

    from jmoe.convert import from_hf

    checkpoint = write_hf_checkpoint(tmp_path / "tiny-mixtral")
    engine = Engine.from_hf(checkpoint, quantize="fp8", num_slots=1, max_seq_len=16)
    assert engine.config.moe.expert_quantization == "fp8"
    _, variables = from_hf(checkpoint)
    float_experts = variables["params"]["layers_0"]["moe"]["experts"]
    experts = engine.steps.variables["params"]["layers_0"]["moe"]["experts"]
    assert experts["w_gate"].dtype == "float8_e4m3fn"
    w = np.asarray(float_experts["w_gate"], np.float32)
    scale = np.asarray(experts["w_gate_scale"])[:, None]
    deq = np.asarray(experts["w_gate"], np.float32) * scale
    # half an e4m3 step: 2^-4 |w| for normals, 2^-10 scale below the smallest normal
    assert np.all(np.abs(deq - w) <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * 1.0001)
