"""`bench/run_all.py --tiny` runs the benchmarks with tiny shapes and writes the benchmarks page
with its plots; the one-hot einsum dispatch it compares against equals a NumPy loop."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = pathlib.Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from grouped_matmul import one_hot_einsum  # noqa: E402


def test_one_hot_einsum_dispatch_equals_a_loop():
    sizes = [3, 3, 3, 3]
    x = np.asarray(jax.random.normal(jax.random.key(0), (12, 5)))
    w = np.asarray(jax.random.normal(jax.random.key(1), (4, 5, 7)))
    groups = np.repeat(np.arange(4), sizes)
    want = np.stack([x[r] @ w[groups[r]] for r in range(12)])
    got = one_hot_einsum(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # every benchmark at tiny sizes (minutes of CPU): `pytest -m slow` runs it
def test_run_all_tiny_writes_the_page(tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--tiny",
            "--results",
            str(tmp_path / "r"),
            "--page",
            str(page),
            "--note",
            "a test run",
        ],  # fmt: skip
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "r" / "run_all.json").read_text())
    assert record["mode"] == "tiny" and record["machine"]["device_count"] >= 1
    ran = [name for name, r in record["benchmarks"].items() if r["status"] == "ok"]
    assert ran == [
        "moe_layer",
        "moe_layer_adaptive",
        "grouped_matmul",
        "train_step",
        "expert_parallel",
    ]
    text = page.read_text()
    headings = ["MoE layer against a dense FFN", "Adaptive routers", "Grouped matmul"]
    headings += ["Training tokens/s", "Expert parallelism", "a test run", record["machine"]["jax"]]
    for heading in headings:
        assert heading in text
    for name in ran:
        assert (page.parent / f"benchmarks_{name}.png").stat().st_size > 1000
