"""Device meshes, logical-axis sharding rules and multi-host setup, on JAX's own runtime.

A `MeshConfig(data, fsdp, expert, tensor)` becomes a `jax.sharding.Mesh` over every device of
every process, with `Auto` axis types (GSPMD propagates shardings; `jax.make_mesh` would default to
`Explicit`). Tokens are split over `BATCH_AXES` (the `expert` axis holds different tokens too: the
all-to-all of `jmoe.moe.expert_parallel` exchanges them); experts over `expert`; large weights over
`fsdp` (gathered before use, gradients reduce-scattered); the expert hidden width over `tensor`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe.validation import check

MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over all devices of all processes.

    Each axis is a positive size; at most one may be None, meaning "the devices left over"
    (never -1). The product must equal the device count. Axis order is `MESH_AXES`.
    """

    data: int | None = None
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            check(
                axis,
                size,
                size is None or size >= 1,
                "None (fill) or an integer >= 1",
                "MeshConfig",
            )
        unset = [axis for axis, size in sizes.items() if size is None]
        if len(unset) > 1:
            raise ValueError(
                f"MeshConfig axes {unset} are all None: at most one axis may be None "
                "(it takes the devices left over)"
            )

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Sizes of `MESH_AXES` for `num_devices` devices, filling the None axis."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        fixed = math.prod(size for size in sizes.values() if size is not None)
        unset = [axis for axis, size in sizes.items() if size is None]
        if unset:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {sizes}: the fixed axes multiply to {fixed}, which does not "
                    f"divide the {num_devices} devices, so {unset[0]!r} cannot fill the rest"
                )
            sizes[unset[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {sizes} multiplies to {fixed} devices but there are "
                f"{num_devices}: change the sizes or set one axis to None to fill the rest"
            )
        return sizes


BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes. A dimension is sharded only when its size divides evenly.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "expert": ("expert",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
}

# Logical axes of parameters, by the last two names of their path.
PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("experts", "w_gate"): ("expert", "embed", "mlp"),
    ("experts", "w_up"): ("expert", "embed", "mlp"),
    ("experts", "w_down"): ("expert", "mlp", "embed"),
    ("experts", "b_gate"): ("expert", "mlp"),
    ("experts", "b_up"): ("expert", "mlp"),
    ("experts", "b_down"): ("expert", None),
    ("experts", "w_gate_scale"): ("expert", "mlp"),
    ("experts", "w_up_scale"): ("expert", "mlp"),
    ("experts", "w_down_scale"): ("expert", None),
    ("shared", "w_gate"): ("embed", "mlp"),
    ("shared", "w_up"): ("embed", "mlp"),
    ("shared", "w_down"): ("mlp", "embed"),
}

# Parameters without a rule above are FSDP-sharded on their largest divisible dim from this size.
FSDP_MIN_SIZE = 2**18


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` (all `Auto`) over all devices of all processes.

    Args:
      config: axis sizes; None gives every device to "data". At most one size may be None,
        meaning the devices left over (never -1).
      devices: default `jax.devices()` (every process's devices).

    Raises:
      ValueError: naming the sizes and the device count when they do not match.
    """
    config = MeshConfig() if config is None else config
    devices = jax.devices() if devices is None else list(devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)


def axis_size(mesh: Mesh | None, axes: str | Sequence[str]) -> int:
    """Product of the sizes of `axes` in `mesh` (1 for a missing axis or no mesh)."""
    axes = (axes,) if isinstance(axes, str) else axes
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(axis, 1) for axis in axes]))


def mesh_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[str, ...]:
    """The names among `axes` that `mesh` has (a hand-made mesh may leave some out)."""
    return tuple(axis for axis in axes if axis in mesh.axis_names)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """`PartitionSpec` of an array from its logical axes, via `LOGICAL_RULES`.

    A dimension keeps only the mesh axes (of size > 1, not used by an earlier dimension) whose
    product divides it; other dimensions are replicated.
    """
    used, spec = set(), []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = [
            a for a in LOGICAL_RULES.get(name, ()) if mesh.shape.get(a, 1) > 1 and a not in used
        ]
        while axes and size % axis_size(mesh, axes):
            axes.pop()
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def _param_spec(path, leaf, mesh: Mesh) -> P:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    logical = PARAM_AXES.get(names[-2:])
    if logical is not None and len(shape) == len(logical) + 1:
        logical = (None, *logical)  # stacked by `scan_layers`: a leading layer axis
    if logical is not None and len(logical) == len(shape):
        return logical_to_spec(logical, shape, mesh)
    fsdp = axis_size(mesh, "fsdp")
    if fsdp > 1 and np.prod(shape, dtype=np.int64) >= FSDP_MIN_SIZE:
        for dim in np.argsort(shape, kind="stable")[::-1]:
            if shape[dim] % fsdp == 0:
                return P(*("fsdp" if d == dim else None for d in range(len(shape))))
    return P()


def param_shardings(params, mesh: Mesh):
    """`NamedSharding` of every leaf of a params tree (any collection) from `PARAM_AXES`.

    Expert weights and biases are split over "expert" (and "tensor" on the hidden width, "fsdp"
    on the model width); other leaves of at least `FSDP_MIN_SIZE` elements over "fsdp"; the rest
    replicated.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _param_spec(path, leaf, mesh)), params
    )


def shard_params(params, mesh: Mesh):
    """Places a params tree (the same values on every process) by `param_shardings`."""
    return jax.device_put(params, param_shardings(params, mesh))


def init_sharded(init_fn, mesh: Mesh, *args):
    """`init_fn(*args)` under jit, its outputs born sharded by `param_shardings`.

    Each device computes only its shards, so nothing is materialised whole on one host; use it
    for models too large for one device and on several processes (`args` equal on all of them).

    Examples:
      >>> variables = init_sharded(lambda: MoE(cfg).init(jax.random.key(0), x_BxSxD), mesh)
    """
    shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch or token) axis split over `BATCH_AXES`, the rest replicated."""
    return NamedSharding(mesh, P(mesh_axes(mesh, BATCH_AXES), *(None,) * (ndim - 1)))


def process_batch_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of a global batch this process must load (its devices' share, in order).

    Raises:
      ValueError: when `global_batch` does not split evenly over the batch shards.
    """
    shards = axis_size(mesh, BATCH_AXES)
    if global_batch % shards:
        raise ValueError(
            f"{global_batch=} is not a multiple of the {shards} batch shards "
            f"(mesh {dict(mesh.shape)} over {BATCH_AXES})"
        )
    sharding = batch_sharding(mesh, 1)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({idx[0].stop or global_batch for idx in index_map.values()})
    if stops[-1] - starts[0] != len(starts) * (global_batch // shards):
        raise ValueError(f"this process's batch rows {starts=} {stops=} are not contiguous")
    return slice(starts[0], stops[-1])


def shard_batch(local_batch, mesh: Mesh):
    """Global arrays from this process's rows (`process_batch_slice`) of every leaf."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)


_CLUSTER_ENV = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Starts JAX's distributed runtime (`jax.distributed.initialize`) when there are processes.

    Each argument falls back to `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
    With none of them set, JAX's own cluster detection is used on a TPU pod slice, SLURM or Open
    MPI; a single process (or none of these) is a no-op. Call it before any other JAX call.

    Returns:
      True when the distributed runtime is (now) initialised.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit) and not any(k in env for k in _CLUSTER_ENV):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
