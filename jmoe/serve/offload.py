"""Offloaded experts: every MoE layer's expert weights in host memory, a fixed number of them in
a device-resident cache.

- `ExpertStore`: the weight set of each (MoE layer, expert) in host memory, in the compute
  dtype. On a backend with a `pinned_host` memory kind (GPU, TPU, and recent CPU builds) the
  sets are JAX arrays placed there, so a copy to the device is one DMA; elsewhere they are
  NumPy arrays. On CPU "host" and "device" are the same RAM: the store and the cache then
  measure the mechanism (bookkeeping, copies, extra dispatches), not a bus.
- `ExpertCache`: `N` device slots per weight name (`[N, D, F]` inputs, `[N, F, D]` down, `[N, F]`
  / `[N, D]` biases) holding the most recently used (layer, expert) sets (LRU). `ensure` makes
  a layer's needed experts resident (copying in the missing ones) and returns where each one
  sits; `prefetch` starts copying predicted ones early. `stats` counts hits, misses,
  evictions, bytes moved and how many prefetches were used or wasted.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.compress.surgery import moe_layer_weights
from jmoe.lm.config import ModelConfig

HOST_MEMORY_KIND = "pinned_host"
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_BYTE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def host_memory_kind(device: jax.Device) -> str | None:
    """`pinned_host` when `device` can address that memory kind, else None (NumPy arrays)."""
    try:
        kinds = {memory.kind for memory in device.addressable_memories()}
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    return HOST_MEMORY_KIND if HOST_MEMORY_KIND in kinds else None


class ExpertStore:
    """Each MoE layer's routed expert weights in host memory, one weight set per expert.

    Args:
      config: the model config (unrolled or scanned layout, as `variables`).
      variables: the model variables; only the `experts` subtrees of the MoE layers are read.
      dtype: the dtype the sets are stored and copied in (the compute dtype: the MoE layer
        casts its expert weights to it before use, so storing them cast changes no result).
      device: where the sets are copied to (its host memory kind is used when it has one).

    Attributes:
      layers: the MoE layers' model indices, in order.
      names: the weight names of a set (`w_gate`, `w_up`, `w_down`, biases).
      shapes: per name, one expert's weight shape.
      set_bytes: bytes of one expert's weight set.
      memory_kind: `pinned_host`, or None for NumPy arrays.
    """

    def __init__(self, config: ModelConfig, variables: dict, dtype, device: jax.Device):
        self.dtype = jnp.dtype(dtype)
        self.memory_kind = host_memory_kind(device)
        host = None
        if self.memory_kind is not None:
            host = jax.sharding.SingleDeviceSharding(device, memory_kind=self.memory_kind)
        self.layers: tuple[int, ...] = ()
        self._sets: dict[tuple[int, int], dict[str, object]] = {}
        for weights in moe_layer_weights(config, variables):
            experts = {
                k: np.asarray(jnp.asarray(v).astype(self.dtype))
                for k, v in weights.params["experts"].items()
            }
            self.names = tuple(sorted(experts))
            self.shapes = {k: v.shape[1:] for k, v in experts.items()}
            self.num_experts = next(iter(experts.values())).shape[0]
            self.layers += (weights.layer,)
            for e in range(self.num_experts):
                one = {k: v[e] for k, v in experts.items()}
                self._sets[weights.layer, e] = one if host is None else jax.device_put(one, host)
        if not self.layers:
            raise ValueError("the model has no MoE layers: there are no experts to offload")
        self.set_bytes = sum(int(np.prod(s)) for s in self.shapes.values()) * self.dtype.itemsize

    def __getitem__(self, key: tuple[int, int]) -> dict[str, object]:
        """The weight set of `(layer, expert)`, `{name: host array}`."""
        return self._sets[key]

    @property
    def total_bytes(self) -> int:
        """Bytes of every stored set (what a fully resident model keeps on the device, in the
        compute dtype)."""
        return self.set_bytes * len(self._sets)


def cache_experts(size: int | str, set_bytes: int) -> int:
    """A cache size in experts from `size`: an int (experts) or a byte string such as
    "64MiB" / "2GB" / "1048576" (as many whole expert weight sets as fit)."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise ValueError(
            f"expert cache size {size!r} is neither a number of experts nor a byte size "
            f"(e.g. 48, '64MiB', '2GB')"
        )
    number, unit = match.groups()
    if unit is None and "." not in number:
        return int(number)  # a plain integer string counts experts
    return int(float(number) * _BYTE_UNITS[(unit or "").upper()] // set_bytes)


@dataclasses.dataclass
class CacheStats:
    """Counters of an `ExpertCache` (every (layer, expert) a step needs counts once).

    Attributes:
      hits: needed sets already resident (prefetched ones included).
      misses: needed sets copied in on demand.
      evictions: resident sets dropped to make room.
      bytes_moved: host-to-device bytes copied (on demand and prefetched).
      prefetched: sets copied in ahead of need.
      prefetch_hits: prefetched sets that the layer then needed.
      prefetch_wasted: prefetched sets the layer did not need (or evicted before its step).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _write_slots(arrays: dict, slots_M, sets: list[dict]) -> dict:
    """`arrays` with the M weight `sets` written at `slots_M` (one compile per M).

    One in-place slice update per set: XLA:CPU rewrites the whole operand for a scatter."""
    out = {}
    for name, a in arrays.items():
        for m, weights in enumerate(sets):
            a = jax.lax.dynamic_update_index_in_dim(a, weights[name], slots_M[m], 0)
        out[name] = a
    return out


class ExpertCache:
    """`capacity` device slots of expert weight sets with LRU eviction over (layer, expert).

    Args:
      store: the host-resident weights.
      capacity: slots (expert weight sets) kept on the device.
      device: the device holding the slots.

    Attributes:
      arrays: `{name: [capacity, ...]}` the slots, in the store's dtype (pass them to the
        compiled step; they are replaced, not updated in place, when sets are copied in).
      stats: the `CacheStats`.
    """

    def __init__(self, store: ExpertStore, capacity: int, device: jax.Device):
        if capacity < 1:
            raise ValueError(f"the expert cache needs at least 1 slot, got {capacity}")
        self.store, self.capacity = store, capacity
        self._on_device = jax.sharding.SingleDeviceSharding(
            device, memory_kind=device.default_memory().kind
        )
        self.arrays = jax.device_put(
            {k: jnp.zeros((capacity, *s), store.dtype) for k, s in store.shapes.items()},
            self._on_device,
        )
        self.stats = CacheStats()
        self._slots: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))
        self._prefetched: dict[tuple[int, int], bool] = {}  # key -> loaded ahead, not yet needed
        self._write = jax.jit(_write_slots, donate_argnums=0)

    @property
    def resident_bytes(self) -> int:
        """Device bytes the slots take (allocated whether filled or not)."""
        return self.capacity * self.store.set_bytes

    def resident(self) -> list[tuple[int, int]]:
        """The resident (layer, expert) keys, least recently used first."""
        return list(self._slots)

    def ensure(
        self, layer: int, experts: Iterable[int], step_experts: Iterable[int] | None = None
    ) -> dict[int, int]:
        """Makes the `experts` of `layer` resident and returns `{expert: slot}`.

        Resident ones are hits (marked most recently used first, so the copies below never
        evict them); the others are misses, copied in over the least recently used slots.
        The layer's prefetched sets count as used if `step_experts` (all the experts of the
        layer's step, when it runs in several passes; default `experts`) holds them.

        Raises:
          ValueError: more distinct experts than the cache holds.
        """
        experts = sorted(set(int(e) for e in experts))
        if len(experts) > self.capacity:
            raise ValueError(
                f"layer {layer} needs {len(experts)} experts at once but the cache holds "
                f"{self.capacity}: raise the expert cache size"
            )
        used = experts if step_experts is None else {int(e) for e in step_experts}
        self._settle_prefetches(layer, used)
        keys = [(layer, e) for e in experts]
        for key in keys:
            if key in self._slots:
                self.stats.hits += 1
                self._slots.move_to_end(key)
        missing = [key for key in keys if key not in self._slots]
        self.stats.misses += len(missing)
        self._load(missing)
        return {e: self._slots[layer, e] for e in experts}

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Starts copying the predicted `experts` of `layer` that are not resident (the copy
        is asynchronous; the step that needs them waits for it). A prediction larger than
        the cache is skipped."""
        keys = [(layer, int(e)) for e in sorted(set(experts))]
        if len(keys) > self.capacity:
            return
        for key in keys:
            if key in self._slots:
                self._slots.move_to_end(key)
        missing = [key for key in keys if key not in self._slots]
        self.stats.prefetched += len(missing)
        self._prefetched.update(dict.fromkeys(missing, True))
        self._load(missing)

    def _settle_prefetches(self, layer: int, experts: Iterable[int]) -> None:
        """Counts each prefetched set of `layer` as used or wasted, once: at its layer's step."""
        for key in [k for k in self._prefetched if k[0] == layer]:
            del self._prefetched[key]
            if key[1] in experts and key in self._slots:
                self.stats.prefetch_hits += 1
            else:
                self.stats.prefetch_wasted += 1

    def _load(self, keys: list[tuple[int, int]]) -> None:
        """Copies the sets of `keys` (not resident) in over free or least recently used slots:
        one host-to-device copy and one cache write for all of them."""
        if not keys:
            return
        slots = []
        for key in keys:
            if self._free:
                slot = self._free.pop()
            else:
                evicted, slot = self._slots.popitem(last=False)
                self.stats.evictions += 1
                if self._prefetched.pop(evicted, False):
                    self.stats.prefetch_wasted += 1
            self._slots[key] = slot
            slots.append(slot)
        # `device_put` returns at once: the copy runs while the host goes on.
        sets = jax.device_put([self.store[key] for key in keys], self._on_device)
        self.arrays = self._write(self.arrays, np.asarray(slots, np.int32), sets)
        self.stats.bytes_moved += len(keys) * self.store.set_bytes
