"""Decisions every process of a multi-host run takes together (stop, fall back, give up).

Each process calls the same function at the same point of the program; one small all-gather
makes them agree. With one process nothing is exchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one of them."""
    if jax.process_count() == 1:
        return bool(flag)
    flags_P = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags_P))


def is_chief() -> bool:
    """Whether this is process 0, the one that writes shared files."""
    return jax.process_index() == 0
