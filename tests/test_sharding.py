"""jmoe.sharding: meshes, sharding rules, per-process data and a real two-process run.

Checks that need several devices run in subprocesses (see test_expert_parallel.py); the
two-process test launches `sharding_multiprocess.py` twice on localhost with `jax.distributed`.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jmoe import sharding
from jmoe.moe import expert_parallel
from jmoe.sharding import MESH_AXES, MeshConfig

TESTS = pathlib.Path(__file__).parent


def test_make_mesh_fills_the_none_axis_with_auto_axes():
    mesh = sharding.make_mesh(MeshConfig(data=None, expert=1))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "expert": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_rejects_a_wrong_device_count():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"multiplies to 4 devices but there are 1"):
        sharding.make_mesh(MeshConfig(data=2, expert=2), devices)
    with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 1 devices"):
        sharding.make_mesh(MeshConfig(data=None, expert=3), devices)
    with pytest.raises(ValueError, match="expert=-1"):
        MeshConfig(expert=-1)


def test_logical_to_spec_keeps_only_dividing_axes():
    mesh = sharding.make_mesh(MeshConfig(data=1))  # one device: every axis has size 1
    assert sharding.logical_to_spec(("expert", "embed", "mlp"), (4, 8, 16), mesh) == (
        jax.sharding.PartitionSpec(None, None, None)
    )
    assert sharding.axis_size(None, "expert") == 1
    assert sharding.axis_size(mesh, sharding.BATCH_AXES) == 1


def test_batch_helpers_on_one_process():
    mesh = sharding.make_mesh()
    assert sharding.process_batch_slice(6, mesh) == slice(0, 6)
    x = np.arange(12.0).reshape(6, 2)
    batch = sharding.shard_batch({"x": x}, mesh)
    np.testing.assert_array_equal(batch["x"], x)
    assert batch["x"].sharding.spec == sharding.batch_sharding(mesh, 2).spec


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in sharding._CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    assert sharding.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert sharding.initialize_distributed("localhost:1234") is False


@pytest.mark.parametrize(
    "tokens, k, per_device, capacity, want",
    [
        (4, 2, 2, None, 8),  # dropless: every slot of a token may go to one device
        (4, 2, 1, None, 4),  # a token picks an expert once: at most one slot per expert
        (4, 8, 2, None, 8),
        (4, 2, 2, 1, 2),  # capacity 1 per expert, 2 experts per device
        (4, 2, 2, 9, 8),
    ],
)
def test_chunk_rows_is_the_worst_case(tokens, k, per_device, capacity, want):
    assert expert_parallel.chunk_rows(tokens, k, per_device, capacity) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two `jax.distributed` processes (2 CPU devices each, gloo) match a one-device run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    env.setdefault("JMOE_JAX_CACHE", str(TESTS.parent / ".jax_cache"))
    script, port = str(TESTS / "sharding_multiprocess.py"), str(_free_port())
    multi, single = tmp_path / "multi.json", tmp_path / "single.json"
    procs = [
        subprocess.Popen(
            [sys.executable, script, port, str(i), "2", str(multi)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    one = subprocess.run(
        [sys.executable, script, "0", "0", "0", str(single)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = json.loads(multi.read_text()), json.loads(single.read_text())
    assert got["devices"] == 4
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    assert want["losses"][-1] < want["losses"][0]
