"""Quantized experts on a trained run: expert memory, logit error and decode step time.

For float, int8 and fp8 experts (`jmoe.compress.quantize.quantize_experts`) of one `train.py`
run: the routed experts' bytes, the next-token loss and the logits against the float model's on
a fixed text (the Python standard library's `json.decoder` and `csv` sources; a run trained on
the stdlib corpus may have seen them, which matters little when comparing the variants with
each other), and the engine's decode step time with every slot busy (variants interleaved,
medians).

    python bench/quantize.py --run runs/tiny    # prints a table, writes bench/results/quantize.json
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from results_io import write_results

from jmoe.compress.quantize import quantize_experts
from jmoe.compress.surgery import expert_param_bytes
from jmoe.lm.model import Transformer
from jmoe.serve.batching import Request
from jmoe.serve.engine import Engine
from jmoe.serve.runs import load_run
from jmoe.serve.sampling import SamplingParams

KINDS = ("int8", "fp8")


def text_tokens(tokenizer, seq_len: int, rows: int) -> np.ndarray:
    """`[rows, seq_len + 1]` token ids cut from the `json` and `csv` module sources."""
    text = inspect.getsource(json.decoder) + inspect.getsource(csv)
    ids = np.asarray(tokenizer.encode(text), np.int32)
    n = min(rows, len(ids) // (seq_len + 1))
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def logit_report(config, variables, ref_logits, tokens) -> dict:
    """Next-token loss of the model and its logits' error against the float model's."""
    logits = jax.jit(lambda v, t: Transformer(config).apply(v, t)[0])(variables, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    loss = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    out = {"loss": float(loss)}
    if ref_logits is not None:
        err = jnp.abs(logits - ref_logits) / ref_logits.std()
        out.update(
            mean_logit_error=float(err.mean()),
            max_logit_error=float(err.max()),
            top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        )
    return out, logits


def decode_step(engine: Engine, length: int):
    """A function running one decode step of every slot at cache length `length`."""
    s = engine.num_slots
    row = Request([0], SamplingParams(), engine.tokenizer).sampling_row()
    rows = {k: np.full(s, v) for k, v in row.items()}
    rows.update(active=np.ones(s, bool), counter=np.zeros(s, np.int32))
    positions = np.full(s, length // 2, np.int32)
    # the step is dispatched asynchronously: wait for its outputs, as the engine does
    return lambda: jax.device_get(engine.steps.decode(positions, rows, length))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tiny", help="a train.py run directory")
    parser.add_argument("--slots", type=int, default=8, help="decode slots, all busy")
    parser.add_argument("--cache", type=int, default=128, help="cache length the step reads")
    parser.add_argument("--runs", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--rows", type=int, default=8, help="text sequences scored")
    parser.add_argument("--out", default="bench/results/quantize.json")
    args = parser.parse_args(argv)

    run = load_run(args.run)
    config, variables = run.config.model, run.variables
    models = {"float32": (config, variables)}
    models.update({kind: quantize_experts(config, variables, kind) for kind in KINDS})
    seq_len = min(run.config.data.seq_len, config.max_seq_len - 1)
    tokens = jnp.asarray(text_tokens(run.tokenizer, seq_len, args.rows))

    results, ref_logits = {}, None
    for name, (cfg, var) in models.items():
        report, logits = logit_report(cfg, var, ref_logits, tokens)
        ref_logits = logits if ref_logits is None else ref_logits
        results[name] = {"expert_bytes": expert_param_bytes(cfg, var), **report}

    # Decode steps, interleaved so the machine's load falls on every variant alike.
    steps = {
        name: decode_step(Engine(cfg, var, run.tokenizer, num_slots=args.slots), args.cache)
        for name, (cfg, var) in models.items()
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # compile
    for _ in range(args.runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["float32"])
    for name in steps:
        results[name]["decode_step_ms"] = 1e3 * statistics.median(times[name])
        results[name]["decode_step_ratio"] = statistics.median(times[name]) / base

    print(f"{args.run}: {args.slots} slots, cache {args.cache}, {args.runs} interleaved runs")
    print(f"{'experts':<8} {'bytes':>10} {'ratio':>6} {'loss':>7} {'mean err':>9} {'max err':>8} "
          f"{'top-1':>6} {'step ms':>8} {'ratio':>6}")  # fmt: skip
    float_bytes = results["float32"]["expert_bytes"]
    for name, r in results.items():
        print(
            f"{name:<8} {r['expert_bytes']:>10} {r['expert_bytes'] / float_bytes:>6.3f} "
            f"{r['loss']:>7.4f} {r.get('mean_logit_error', 0):>9.4f} "
            f"{r.get('max_logit_error', 0):>8.3f} {r.get('top1_agreement', 1):>6.3f} "
            f"{r['decode_step_ms']:>8.2f} {r['decode_step_ratio']:>6.3f}"
        )
    meta = {
        "run": args.run,
        "slots": args.slots,
        "cache": args.cache,
        "runs": args.runs,
        "scored_tokens": int(tokens[:, 1:].size),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(),
        "logit_error_unit": "absolute error / std of the float model's logits",
    }
    write_results(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
