"""Expert parallelism on 8 host CPU devices: the layer on a mesh equals the one-device layer.

The cases live in `sharding_cases.py` and run in a subprocess, because the device count
(`--xla_force_host_platform_device_count=8`) is fixed when JAX starts and the rest of the suite
runs on one device. Each group below is one subprocess; its output names any failing case.
"""

import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parents[1]
GROUPS = {
    "meshes": ["top_k_meshes", "param_shardings", "bad_meshes"],
    "routers": ["sigmoid_groups_fsdp", "null_experts", "top_p", "chain_of_experts"],
    "biases": ["expert_biases", "quantized_experts"],
    "loads": ["skewed_to_one_device", "capacity_overflow"],
    "trainer": ["train_steps"],
}


def run_cases(names: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    env.setdefault("JMOE_JAX_CACHE", str(TESTS.parent / ".jax_cache"))
    cmd = [sys.executable, str(TESTS / "sharding_cases.py"), *names]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("group", list(GROUPS))
def test_expert_parallel_cases(group):
    result = run_cases(GROUPS[group])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for name in GROUPS[group]:
        assert f"{name}: ok" in result.stdout
