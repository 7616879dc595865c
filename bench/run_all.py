"""Every benchmark of bench/ in one command, and one page of their ratios: docs/benchmarks.md.

Each benchmark runs in its own process (the expert-parallel one needs its forced CPU devices set
before JAX starts) and writes JSON into `--results`; then the page is written from those files,
with the machine (CPU model, device kind and count, jax and jaxlib versions) and one PNG plot per
table next to it. Every ratio on the page comes from variants timed interleaved in one process.

    python bench/run_all.py --quick          # small shapes, a few minutes on a 2-core CPU
    python bench/run_all.py                  # each benchmark's own default shapes
    python bench/run_all.py --tiny --page /tmp/b.md   # seconds per benchmark: a smoke test
    python bench/run_all.py --page-only      # rewrite the page from the JSON already there
    python bench/run_all.py --quick --budget 1800   # stop what still runs after 30 minutes

The Pallas kernel benchmark (TFLOP/s against the dense-matmul ceiling) runs only on a GPU or
TPU: on a CPU the kernels run in the Pallas interpreter, which is a test, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from run_all_page import write_page

BENCH = pathlib.Path(__file__).parent
ROOT = BENCH.parent

# The tiny train_step / serve model shapes: seconds, not timings.
_TINY_LM = [
    "data.tokenizer=byte",
    "data.max_bytes=200000",
    "data.seq_len=32",
    "data.batch_size=2",
    "model.vocab_size=257",
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.moe.d_ff=32",
]

# entry -> (script in bench/, mode -> arguments or None when not run in that mode).
SUITE: dict[str, tuple[str, dict[str, list[str] | None]]] = {
    "moe_layer": ("moe_layer", {
        "full": [],
        "quick": ["--tokens", "1024", "--d-model", "256", "--d-ff", "512", "--experts", "8",
                  "--k", "1", "2", "--runs", "9", "--pause", "0.05"],
        "tiny": ["--tokens", "64", "--d-model", "32", "--d-ff", "32", "--experts", "4", "--k",
                 "2", "--runs", "1", "--pause", "0"],
    }),
    "moe_layer_adaptive": ("moe_layer", {
        "full": ["--adaptive"],
        "quick": ["--adaptive", "--tokens", "1024", "--d-model", "256", "--d-ff", "512",
                  "--experts", "16", "--k", "4", "--controller-steps", "60", "--runs", "9",
                  "--pause", "0.05"],
        "tiny": ["--adaptive", "--tokens", "64", "--d-model", "32", "--d-ff", "32", "--experts",
                 "4", "--k", "2", "--controller-steps", "2", "--runs", "1", "--pause", "0"],
    }),
    "grouped_matmul": ("grouped_matmul", {
        "full": [],
        "quick": ["--rows", "2048", "--k", "128", "--n", "256", "--experts", "8", "32",
                  "--runs", "9"],
        "tiny": ["--rows", "64", "--k", "16", "--n", "16", "--experts", "4", "--runs", "1"],
    }),
    "train_step": ("train_step", {
        "full": [],
        "quick": ["--runs", "9", "--steps", "1", "--warmup", "3", "--variants", "top_k", "null",
                  "top_p", "chain", "--set", "model.n_layers=2", "data.tokenizer=byte",
                  "model.vocab_size=257", "data.max_bytes=1000000"],
        "tiny": ["--runs", "1", "--steps", "1", "--warmup", "1", "--variants", "top_k",
                 "--set", *_TINY_LM],
    }),
    "expert_parallel": ("expert_parallel", {
        "full": [],
        "quick": ["--tokens", "1024", "--seq", "128", "--runs", "9"],  # a sequence per device
        "tiny": ["--tokens", "128", "--seq", "16", "--d-model", "16", "--d-ff", "16",
                 "--runs", "1"],
    }),
    "serve": ("serve", {
        "full": [],
        "quick": ["--steps", "8", "--rounds", "9", "--runs", "9", "--clients", "8",
                  "--max-tokens", "16", "--load-rounds", "3"],
        "tiny": None,  # warms up nine engines over every bucket: minutes even at tiny sizes
    }),
    "kernels": ("kernels", {"full": [], "quick": ["--scale", "4", "--runs", "9"], "tiny": None}),
}  # fmt: skip
ACCELERATOR_ONLY = ("kernels",)


def machine() -> dict:
    """CPU model and count, device kind and count, jax / jaxlib versions, from a child process
    (so this process never takes an accelerator's memory from the benchmarks)."""
    probe = (
        "import json, jax, jaxlib; d = jax.devices(); print(json.dumps({'backend': "
        "jax.default_backend(), 'device_kind': d[0].device_kind, 'device_count': len(d), "
        "'jax': jax.__version__, 'jaxlib': jaxlib.__version__}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out.strip().splitlines()[-1])
    cpu = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        **info,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(
    name: str, script: str, args: list[str], results: pathlib.Path, timeout: float | None
) -> dict:
    """Runs `bench/<script>.py args --out results/<name>.json` for at most `timeout` seconds;
    returns its status and time."""
    out = results / f"{name}.json"
    command = [sys.executable, str(BENCH / f"{script}.py"), *args, "--out", str(out)]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        returncode = subprocess.run(command, cwd=ROOT, timeout=timeout).returncode
        status = "ok" if returncode == 0 else f"failed (exit status {returncode})"
    except subprocess.TimeoutExpired:
        status = f"stopped when the run's --budget was spent ({timeout:.0f} s left for it)"
    seconds = time.perf_counter() - start
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": seconds, "args": args}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes (minutes on a CPU)")
    mode.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument(
        "--only", nargs="+", choices=list(SUITE), help="run these (keep the others' results)"
    )
    parser.add_argument("--results", default="bench/results/run_all", help="JSON folder")
    parser.add_argument("--page", default="docs/benchmarks.md", help="the Markdown page")
    parser.add_argument("--page-only", action="store_true", help="no runs: rewrite the page")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for all runs; later ones are stopped"
    )
    parser.add_argument(
        "--note", default="", help="a sentence for the page (e.g. that the machine was shared)"
    )
    args = parser.parse_args()
    results = (ROOT / args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    runs_file = results / "run_all.json"
    if args.page_only:
        record = json.loads(runs_file.read_text())
    else:
        name = "quick" if args.quick else "tiny" if args.tiny else "full"
        info = machine()
        record = {"mode": name, "machine": info, "note": args.note, "benchmarks": {}}
        if args.only and runs_file.exists():  # rerun some: keep the others' results
            earlier = json.loads(runs_file.read_text())
            if earlier["mode"] == name:
                record["benchmarks"] = earlier["benchmarks"]
        start = time.perf_counter()
        for bench, (script, modes) in SUITE.items():
            if args.only and bench not in args.only:
                continue
            if modes[name] is None:
                record["benchmarks"][bench] = {"status": f"not run in {name} mode"}
            elif bench in ACCELERATOR_ONLY and info["backend"] == "cpu":
                record["benchmarks"][bench] = {
                    "status": "not run on a CPU (the Pallas kernels would run interpreted)"
                }
            else:
                spent = time.perf_counter() - start
                left = None if args.budget is None else args.budget - spent
                if left is not None and left <= 0:
                    record["benchmarks"][bench] = {"status": "not run: the --budget was spent"}
                    continue
                record["benchmarks"][bench] = run_benchmark(
                    bench, script, modes[name], results, left
                )
        record["total_seconds"] = sum(r.get("seconds", 0) for r in record["benchmarks"].values())
        record["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        runs_file.write_text(json.dumps(record, indent=1))
    page = (ROOT / args.page).resolve()
    write_page(record, results, page)
    print(f"wrote {page}")
    failed = [b for b, r in record["benchmarks"].items() if r["status"].startswith("failed")]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
