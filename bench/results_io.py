"""What the benchmark scripts share: the median timing of a jitted call and the JSON results."""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax


def median_seconds(fn, args, runs: int) -> float:
    """Median wall time of `fn(*args)` over `runs` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(path: str | pathlib.Path, results: dict) -> None:
    """Writes `results` as JSON to `path` (parent folders created) and says where."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
