"""Whole-run test helpers: a tiny model on a small real text, the `train.py` command in a
subprocess (sharing the tests' compilation cache), and a strict reader of metrics.jsonl."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = os.environ.get("JMOE_JAX_CACHE", str(REPO / ".jax_cache"))

# Tiny shapes for any preset; routing features are kept.
TINY = [
    "model.vocab_size=64",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.head_dim=8",
    "model.d_ff=32",
    "model.max_seq_len=16",
    "model.moe.d_ff=16",
    "data.seq_len=16",
    "data.batch_size=2",
    "train.warmup_steps=0",
]

# Whole runs: a 2-layer model, the byte tokenizer, every step logged, no progress bar or plot.
RUN = TINY + [
    "model.d_model=32",
    "model.n_layers=2",
    "model.moe.d_ff=32",
    "model.vocab_size=257",
    "data.tokenizer=byte",
    "data.max_bytes=null",
    "data.eval_fraction=0.1",
    "data.batch_size=4",
    "data.prefetch=1",
    "train.learning_rate=1e-2",
    "train.warmup_steps=5",
    "train.log_every=1",
    "train.eval_batches=4",
    "train.progress=false",
    "train.plot=false",
]

# The run that interruption tests stop and resume: 24 steps, checkpoints every 4.
RESUMED = ["train.steps=24", "train.checkpoint_every=4", "train.eval_every=24"]


def write_corpus(directory: pathlib.Path) -> str:
    """A small real text (a standard-library module's source) as one file; returns its path."""
    import json.decoder as module

    path = directory / "corpus.txt"
    path.write_text(pathlib.Path(module.__file__).read_text())
    return str(path)


def cli_env() -> dict:
    """The environment of a `train.py` subprocess: the repository importable, the tests'
    persistent compilation cache."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def lock_holder(workdir) -> subprocess.Popen:
    """Another process holding `workdir`'s run lock (until killed)."""
    hold = (
        "import sys, time; from jmoe.train.run_lock import RunLock; lock = RunLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); time.sleep(600)"
    )
    command = [sys.executable, "-c", hold, str(workdir)]
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def train_cli(*args: str, **popen_kwargs) -> subprocess.Popen:
    """Starts `python train.py ARGS` with captured text output."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python train.py ARGS` to its end."""
    process = train_cli(*args)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def strict_records(path) -> list[dict]:
    """metrics.jsonl records, refusing the non-standard NaN / Infinity constants."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def losses(workdir) -> list[tuple[int, float]]:
    """`(step, train loss)` of every logged step."""
    records = strict_records(pathlib.Path(workdir) / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in records if "loss" in r]
