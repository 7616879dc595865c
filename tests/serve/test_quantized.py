"""serve.py --quantize: the served experts are int8 / fp8, the printed completion is the
quantized engine's, and `/v1/models` reports the quantization."""

import subprocess

import httpx
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
