"""Trains a MoE language model: `python train.py [--config configs/X.yaml] [key.path=value ...]`.

With no arguments it trains the tiny default (configs/tiny.yaml) on the embedded corpus (the
Python standard library's own source) and leaves a run directory in `--workdir` (default
`runs/tiny`) with config.yaml, tokenizer/, checkpoints/, metrics.jsonl and report.png. Running
the same command again resumes from the latest checkpoint. On several hosts, start the same
command on each with `--distributed`.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from jmoe import sharding
from jmoe.train.run_config import load_config
from jmoe.train.trainer import train_and_evaluate


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML preset (default: the tiny CPU run)")
    parser.add_argument("--workdir", default="runs/tiny", help="run directory (resumes if present)")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run first (jmoe.sharding.initialize_distributed: "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a TPU pod slice, "
        "SLURM or Open MPI detected by JAX); CPU processes exchange data with gloo",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. model.moe.top_k=1")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPUs use it
        sharding.initialize_distributed()
    kinds = sorted({d.device_kind for d in jax.devices()})
    print(
        f"jax {jax.__version__}: {jax.process_count()} process(es), {jax.device_count()} "
        f"device(s) ({', '.join(kinds)}); run directory {args.workdir}",
        flush=True,
    )
    try:
        final = train_and_evaluate(config, args.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # config, data, divergence
        sys.exit(f"error: {e}")
    print("final:", json.dumps(final), flush=True)
    return final


if __name__ == "__main__":
    main()
