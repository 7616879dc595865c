"""Serving speed of the engine and the HTTP server, and what adaptive routers save at decode.

- prefill tokens/s of one prompt per bucket length;
- decode tokens/s with 1, 4 and 16 slots, every slot busy (median step time, host work included);
- a load test over real HTTP: N concurrent streaming clients against one client at a time on
  the same 16-slot server (time to first token, latency, total tokens/s) and the compilations
  seen after warm-up (there should be none);
- decode step time, mean active experts per token and expert weights read per step (distinct
  (layer, expert) weight sets the step runs, times their bytes) for top-k, null-expert and
  top-p models with the same 8 experts, at batch 1 and 16.

The model is the tiny default (configs/tiny.yaml) with random weights, or a trained run with
`--run`. Random weights route near-uniformly, so the adaptive models' compute-budget state (the
offset their controller learns in training with `target_active_experts`) is set to hold them
at `--adaptive-target` experts per token, as a model trained with that target would run.

    python bench/serve.py                    # prints tables, writes bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import uvicorn
from results_io import write_results

from jmoe.lm.model import Transformer
from jmoe.serve.app import create_app
from jmoe.serve.engine import Engine
from jmoe.serve.sampling import SamplingParams
from jmoe.serve.steps import compilations
from jmoe.train.run_config import load_config
from jmoe.train.tokenizer import ByteTokenizer

CORPUS = (
    "def parse(text):\n    tokens = []\n    for line in text.splitlines():\n"
    "        if not line.strip():\n            continue\n        tokens.append(line.split())\n"
    "    return tokens\n\nclass Cache:\n    def __init__(self, size):\n        self.size = size\n"
)


def router_variants() -> dict:
    """The three routers at the same 8 true experts: the tiny preset (top-2) and its AdaMoE and
    top-p presets, each adaptive one with a compute-budget controller."""
    return {
        "top_k (k=2)": load_config("configs/tiny.yaml"),
        "null experts (8 + 8 null, 4 slots)": load_config("configs/adamoe.yaml"),
        "top_p (p=0.4, max 4)": load_config(
            "configs/top_p.yaml", ["model.moe.router.target_active_experts=2.0"]
        ),
    }


def set_budget(variables: dict, value: float) -> dict:
    """The variables with every MoE layer's compute-budget state set to `value`."""

    def fill(path, leaf):
        return jnp.full_like(leaf, value) if "budget" in jax.tree_util.keystr(path) else leaf

    return {
        **variables,
        "moe_state": jax.tree_util.tree_map_with_path(fill, variables["moe_state"]),
    }


def random_variables(config, seed: int = 0) -> dict:
    model = Transformer(config.model)
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))


def prompts(n: int, length: int, tokenizer) -> list[list[int]]:
    """`n` different prompts of `length` tokens cut from a code-like text."""
    ids = tokenizer.encode(CORPUS * (1 + length // 50))
    return [ids[(7 * i) % 97 :][:length] for i in range(n)]


def decode_steps(engine: Engine, batch: int, steps: int) -> dict[str, list]:
    """`steps` decode steps with `batch` busy slots (the engine's scheduler stepped by hand):
    per step its seconds, busy rows and expert weight sets read; per request its mean active
    experts per token."""
    requests = engine.submit(
        prompts(batch, 24, engine.tokenizer), SamplingParams(max_tokens=steps + 4), limit=False
    )
    engine.scheduler.step()  # admit (prefill) and the first decode step
    record = {"seconds": [], "rows": [], "experts_read": []}
    for _ in range(steps):
        engine.scheduler.step()
        for key, values in record.items():
            values.append(engine.scheduler.last_decode[key])
    for request in requests:
        engine.cancel(request)
    engine.scheduler.run_until_idle()
    record["active_experts"] = [r.completion.active_experts for r in requests]
    return record


def interleaved_decode(engines: dict, rounds: int, steps: int) -> dict[str, dict]:
    """Decode profiles of several `(engine, batch)`s, taken in turn over `rounds` so that
    machine noise spreads over all of them: median step time, tokens/s, mean weights read."""
    for engine, batch in engines.values():  # compile what the rounds will run, untimed
        decode_steps(engine, batch, steps)
    records = {name: None for name in engines}
    for _ in range(rounds):
        for name, (engine, batch) in engines.items():
            new = decode_steps(engine, batch, steps)
            old = records[name]
            records[name] = new if old is None else {k: old[k] + new[k] for k in new}
    return {
        name: dict(
            step_ms=1e3 * statistics.median(r["seconds"]),
            tokens_per_s=sum(r["rows"]) / sum(r["seconds"]),
            experts_read=float(np.mean(r["experts_read"])),
            active_experts=float(np.mean(r["active_experts"])),
        )
        for name, r in records.items()
    }


def expert_bytes(engine: Engine) -> float:
    """Bytes of one expert's weights in one layer."""
    moe = engine.config.moe
    leaves = jax.tree_util.tree_leaves_with_path(engine.steps.variables["params"])
    total = sum(x.nbytes for path, x in leaves if "experts" in jax.tree_util.keystr(path))
    layers = sum(engine.config.is_moe_layer(i) for i in range(engine.config.n_layers))
    return total / (layers * moe.num_experts)


def calibrate(engine: Engine, target: float, tol: float = 0.05) -> float:
    """Bisects the budget state until greedy decoding runs `target` experts per token."""
    base, low, high = engine.steps.variables, -4.0, 4.0
    batch = prompts(8, 24, engine.tokenizer)
    for _ in range(12):
        mid = (low + high) / 2
        engine.steps.variables = set_budget(base, mid)
        done = engine.generate(batch, max_tokens=16)
        active = float(np.mean([c.active_experts for c in done]))
        if abs(active - target) < tol:
            break
        low, high = (mid, high) if active > target else (low, mid)  # more budget, fewer experts
    return active


def prefill_profile(engine: Engine, runs: int) -> list[dict]:
    rows = []
    row = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0, presence=0.0, frequency=0.0)
    for bucket in engine.buckets[1:]:
        prompt = prompts(1, bucket, engine.tokenizer)[0]
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            engine.steps.prefill(0, prompt, bucket, row, False)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        rows.append(dict(prompt_tokens=bucket, ms=1e3 * seconds, tokens_per_s=bucket / seconds))
    return rows


def _summary(rounds: list[dict], clients: int) -> dict:
    """Medians over the rounds of one mode: tokens/s, and time to first text and latency."""
    per_round = [sum(r["tokens"] for r in x["requests"]) / x["wall"] for x in rounds]
    ttft = [1e3 * r["ttft"] for x in rounds for r in x["requests"] if r["ttft"] is not None]
    latency = [1e3 * r["latency"] for x in rounds for r in x["requests"]]
    return dict(
        clients=clients,
        tokens_per_s=statistics.median(per_round),
        tokens_per_s_rounds=per_round,
        ttft_p50_ms=float(np.percentile(ttft, 50)),
        ttft_p95_ms=float(np.percentile(ttft, 95)),
        latency_p50_ms=float(np.percentile(latency, 50)),
        latency_p95_ms=float(np.percentile(latency, 95)),
    )


def load_test(
    engine: Engine, clients: int, max_tokens: int, rounds: int, kinds=("raw", "openai")
) -> dict:
    """N concurrent streaming clients vs one at a time, over real HTTP on localhost, for each
    client kind of `serve_clients.py` (run in a process of its own). The modes alternate
    within each round; the speedup is the median over rounds of the per-round ratio."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    jobs = [(p, max_tokens) for p in prompts(clients, 32, engine.tokenizer)]
    out = dict(load_average_before=os.getloadavg())
    before = compilations()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(jobs, f)
        f.flush()
        for kind in kinds:
            command = [sys.executable, str(pathlib.Path(__file__).with_name("serve_clients.py")),
                       url, "--model", engine.name, "--prompts", f.name, "--client", kind,
                       "--rounds", str(rounds)]  # fmt: skip
            lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results = [json.loads(line) for line in lines.splitlines()]
            modes = ("sequential", "concurrent")
            by_mode = {m: [r for r in results if r["mode"] == m] for m in modes}
            ratios = [
                _summary([c], clients)["tokens_per_s"] / _summary([s], 1)["tokens_per_s"]
                for s, c in zip(by_mode["sequential"], by_mode["concurrent"], strict=True)
            ]
            out[kind] = dict(
                sequential=_summary(by_mode["sequential"], 1),
                concurrent=_summary(by_mode["concurrent"], clients),
                speedup=statistics.median(ratios),
                speedup_rounds=ratios,
            )
    out["compilations_after_warmup"] = compilations() - before
    out["load_average_after"] = os.getloadavg()
    server.should_exit = True
    thread.join(60)
    return out


class AsciiTokenizer(ByteTokenizer):
    """Bytes below 128 only: random weights then generate whole characters (not bytes that
    are no UTF-8, which the server would hold back) and never end-of-text, so every request
    runs to `max_tokens`."""

    vocab_size = 128


def make_engine(config, variables, slots: int, tokenizer=None, warmup=True) -> Engine:
    tokenizer = tokenizer or AsciiTokenizer()
    engine = Engine(config, variables, tokenizer, num_slots=slots, max_queue=1024)
    if warmup:
        engine.warmup()
    return engine


def print_load_test(load: dict, clients: int) -> None:
    print(f"\n{'load test':>22} {'tok/s':>8} {'TTFT p50/p95 ms':>17} {'latency p50/p95 ms':>20}")
    for kind in ("raw", "openai"):
        for name in ("sequential", "concurrent"):
            r = load[kind][name]
            print(
                f"{kind + ' ' + name + ' x' + str(r['clients']):>22} {r['tokens_per_s']:8.0f} "
                f"{r['ttft_p50_ms']:8.0f}/{r['ttft_p95_ms']:<8.0f} "
                f"{r['latency_p50_ms']:9.0f}/{r['latency_p95_ms']:<9.0f}"
            )
        print(
            f"{kind} clients: {clients} at once give {load[kind]['speedup']:.1f}x the tokens/s "
            "of one at a time (median of the rounds' ratios)"
        )
    print(
        f"compilations after warm-up: {load['compilations_after_warmup']}; load average "
        f"{load['load_average_before'][0]:.1f} before, {load['load_average_after'][0]:.1f} after"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run directory (default: random tiny model)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of steps")
    parser.add_argument("--runs", type=int, default=9, help="prefill timings per length")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64, help="per load-test request")
    parser.add_argument("--load-rounds", type=int, default=9, help="load-test rounds per client")
    parser.add_argument("--load-only", action="store_true", help="only the load test")
    parser.add_argument("--adaptive-target", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()
    compilations()  # start counting
    variants = router_variants()
    base, tokenizer = variants["top_k (k=2)"], None
    variables = random_variables(base)
    result = dict(
        machine=platform.processor() or platform.machine(),
        devices=[d.device_kind for d in jax.devices()],
        jax=jax.__version__,
        python=sys.version.split()[0],
        model="random tiny" if args.run is None else args.run,
    )
    if args.run:
        ref = Engine.from_run(args.run, num_slots=1)
        base, variables, tokenizer = ref.config, ref.steps.variables, ref.tokenizer

    if args.load_only:
        engine = make_engine(base, variables, 16, tokenizer)
        result["load_test"] = load_test(engine, args.clients, args.max_tokens, args.load_rounds)
        print_load_test(result["load_test"], args.clients)
        write_results(args.out, result)
        return
    engines = {b: make_engine(base, variables, b, tokenizer) for b in (1, 4, 16)}
    result["prefill"] = prefill_profile(engines[1], args.runs)
    print(f"{'prefill tokens':>15} {'ms':>8} {'tokens/s':>10}")
    for r in result["prefill"]:
        print(f"{r['prompt_tokens']:15d} {r['ms']:8.2f} {r['tokens_per_s']:10.0f}")
    decode = interleaved_decode({b: (e, b) for b, e in engines.items()}, args.rounds, args.steps)
    result["decode"] = decode
    print(f"\n{'decode batch':>15} {'step ms':>8} {'tokens/s':>10}")
    for b, r in decode.items():
        print(f"{b:15d} {r['step_ms']:8.2f} {r['tokens_per_s']:10.0f}")

    load = load_test(engines[16], args.clients, args.max_tokens, args.load_rounds)
    result["load_test"] = load
    print_load_test(load, args.clients)

    profiled, calibrated = {}, {}
    for name, config in variants.items():
        router_vars = random_variables(config)
        for batch in (1, 16):
            engine = make_engine(config, router_vars, batch, warmup=False)
            if name != "top_k (k=2)":
                calibrated[name, batch] = calibrate(engine, args.adaptive_target)
            profiled[name, batch] = (engine, batch)
    rows = interleaved_decode(profiled, args.rounds, args.steps)
    routers = []
    for (name, batch), row in rows.items():
        engine = profiled[name, batch][0]
        row.update(router=name, batch=batch, calibrated_active=calibrated.get((name, batch)))
        row["expert_mb_per_step"] = row["experts_read"] * expert_bytes(engine) / 1e6
        routers.append(row)
    result["routers"] = routers
    print(
        f"\n{'router':36} {'batch':>5} {'step ms':>8} {'active/token':>12} {'expert MB/step':>15}"
    )
    for r in routers:
        print(
            f"{r['router']:36} {r['batch']:5d} {r['step_ms']:8.2f} {r['active_experts']:12.2f} "
            f"{r['expert_mb_per_step']:15.2f}"
        )
    write_results(args.out, result)


if __name__ == "__main__":
    main()
