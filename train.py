"""Trains a MoE language model: `python train.py [--config configs/X.yaml] [key.path=value ...]`.

With no arguments it trains the tiny default (configs/tiny.yaml) on the embedded corpus (the
Python standard library's own source) and leaves a run directory in `--workdir` (default
`runs/<preset name>`, `runs/tiny` without --config) with config.yaml, tokenizer/, checkpoints/,
metrics.jsonl, tensorboard/, report.png and summary.json. Running the same command again resumes
from the newest checkpoint; on SIGTERM or Ctrl-C the run saves a checkpoint at the step it is on
and exits with status 128 + the signal's number (143, 130). A config, data or run-directory
problem exits with status 2 and one line saying what to change; divergence exits with status 1.
On several hosts, start the same command on each with `--distributed`. `model.init_from=DIR`
fine-tunes a Hugging Face checkpoint directory: its config, tokenizer and weights
(`jmoe.train.init_from`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from jmoe import sharding
from jmoe.train import report
from jmoe.train.errors import UserError
from jmoe.train.preemption import RunStopped
from jmoe.train.run import Diverged, train_and_evaluate
from jmoe.train.run_config import load_config

USAGE_ERROR = 2


def default_workdir(config_path: str | None) -> str:
    """`runs/<preset name>`: runs/small for configs/small.yaml, runs/tiny without a preset."""
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "tiny"
    return os.path.join("runs", name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML preset (default: the tiny CPU run)")
    parser.add_argument(
        "--workdir", default=None, help="run directory (default runs/<preset>; resumes if present)"
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run first (jmoe.sharding.initialize_distributed: "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a TPU pod slice, "
        "SLURM or Open MPI detected by JAX); CPU processes exchange data with gloo",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the options
    workdir = args.workdir or default_workdir(args.config)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as e:
        sys.exit(_error(e, USAGE_ERROR))
    if args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPUs use it
        sharding.initialize_distributed()
    kinds = sorted({d.device_kind for d in jax.devices()})
    print(
        f"jax {jax.__version__}: {jax.process_count()} process(es), {jax.device_count()} "
        f"device(s) ({', '.join(kinds)}); run directory {workdir}",
        flush=True,
    )
    try:
        final = train_and_evaluate(config, workdir)
    except UserError as e:
        sys.exit(_error(e, USAGE_ERROR))
    except Diverged as e:
        sys.exit(_error(e, 1))
    except RunStopped as e:
        print(e, flush=True)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before the first step, or twice
        print("interrupted; rerun the same command to resume from the newest checkpoint")
        sys.exit(130)
    if jax.process_index() == 0:
        print("\n".join(report.summary_lines(final, workdir)), flush=True)
    return final


def _error(error: Exception, status: int) -> int:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    main()
