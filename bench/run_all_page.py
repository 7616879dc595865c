"""The benchmarks page: Markdown tables of ratios and one PNG plot per table, from the JSON that
`bench/run_all.py` collected."""

from __future__ import annotations

import datetime
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(results: pathlib.Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _bars(path: pathlib.Path, groups: list[str], series: dict[str, list[float]], ylabel: str):
    """A grouped bar chart: one group per x label, one bar per series; a line at 1."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _moe_layer(data: dict, plot: pathlib.Path) -> list[str]:
    rows = [r for r in data["rows"] if r["variant"] != "dense"]
    a = data["meta"]["args"]
    lines = [
        "## MoE layer against a dense FFN of equal FLOPs",
        "",
        f"`bench/moe_layer.py`: T={a['tokens']} tokens, D={a['d_model']}, F={a['d_ff']}, "
        "top-k routing, per grouped-matmul implementation; time relative to a dense SwiGLU FFN "
        "of hidden width k x F (the same active FLOPs), medians of "
        f"{a['runs']} interleaved runs.",
        "",
    ]
    table = [
        [r["experts"], r["k"], f"`{r['variant']}`"]
        + (
            ["not run", r["skipped"]]
            if "skipped" in r
            else [f"{r['fwd_ratio']:.2f}x", f"{r['fwd_bwd_ratio']:.2f}x"]
        )
        for r in rows
    ]
    lines += _table(["E", "k", "variant", "forward", "forward+backward"], table)
    timed = [r for r in rows if "skipped" not in r]
    groups = sorted({(r["experts"], r["k"]) for r in timed})
    variants = sorted({r["variant"] for r in timed})
    series = {
        v: [
            next(
                (
                    r["fwd_bwd_ratio"]
                    for r in timed
                    if (r["experts"], r["k"]) == g and r["variant"] == v
                ),
                0.0,
            )  # fmt: skip
            for g in groups
        ]
        for v in variants
    }
    _bars(plot, [f"E={e} k={k}" for e, k in groups], series, "fwd+bwd time / dense")
    return lines + ["", f"![MoE layer over dense]({plot.name})"]


def _moe_layer_adaptive(data: dict, plot: pathlib.Path) -> list[str]:
    a = data["meta"]["args"]
    lines = [
        "## Adaptive routers at matched slots",
        "",
        f"`bench/moe_layer.py --adaptive`: T={a['tokens']} tokens, D={a['d_model']}, "
        f"F={a['d_ff']}; top-k with K slots against the null-expert and top-p routers held at "
        "K/2 active experts per token by the compute-budget controller, and against top-k with "
        "K/2 slots. Savings are relative to top-k with K slots, forward+backward, medians of "
        f"{a['runs']} interleaved runs.",
        "",
    ]
    rows = data["rows"]
    lines += _table(
        ["E", "K", "variant", "active experts", "expert-FLOP saving", "time saving"],
        [
            [
                r["experts"],
                r["k"],
                f"`{r['variant']}`",
                f"{r['active_experts']:.2f}",
                f"{r['flop_saving']:.0%}",
                f"{r['fwd_bwd_saving']:.0%}",
            ]  # fmt: skip
            for r in rows
        ],
    )
    fig, ax = plt.subplots(figsize=(6, 3))
    names = [r["variant"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["flop_saving"] for r in rows], 0.4, label="expert FLOPs")
    ax.bar([x + 0.2 for x in xs], [r["fwd_bwd_saving"] for r in rows], 0.4, label="fwd+bwd time")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("saving vs top-k with K slots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return lines + ["", f"![adaptive router savings]({plot.name})"]


def _grouped_matmul(data: dict, plot: pathlib.Path) -> list[str]:
    a = data["meta"]["args"]
    lines = [
        "## Grouped matmul against `jax.lax.ragged_dot` and a one-hot einsum dispatch",
        "",
        f"`bench/grouped_matmul.py`: M={a['rows']} rows in E equal groups, "
        f"[M, {a['k']}] x [E, {a['k']}, {a['n']}]; time relative to one dense matmul of the "
        f"same FLOPs, medians of {a['runs']} interleaved runs.",
        "",
    ]
    table = [
        [r["experts"], f"`{r['variant']}`", f"{r['fwd_ratio']:.2f}x", f"{r['fwd_bwd_ratio']:.2f}x"]
        for r in data["rows"]
        if r["variant"] != "dense"
    ]
    lines += _table(["E", "variant", "forward", "forward+backward"], table)
    experts = sorted({r["experts"] for r in data["rows"]})
    variants = [v for v in ("xla", "ragged_dot", "one_hot_einsum")]
    series = {
        v: [
            next(
                r["fwd_bwd_ratio"] for r in data["rows"] if r["experts"] == e and r["variant"] == v
            )
            for e in experts
        ]  # fmt: skip
        for v in variants
    }
    _bars(plot, [f"E={e}" for e in experts], series, "fwd+bwd time / dense")
    return lines + ["", f"![grouped matmul over dense]({plot.name})"]


def _train_step(data: dict, plot: pathlib.Path) -> list[str]:
    lines = [
        "## Training tokens/s against the dense model",
        "",
        "`bench/train_step.py`: whole training steps (forward, backward, AdamW, `moe_state` "
        "update) of the tiny LM (configs/tiny.yaml"
        + (
            f" with {', '.join(f'`{o}`' for o in data['overrides'])}"
            if data.get("overrides")
            else ""
        )  # fmt: skip
        + ") per router, against the same LM with dense SwiGLU FFNs of equal active parameters; "
        f"medians of {data['runs']} interleaved runs of {data['steps_per_run']} step(s).",
        "",
    ]
    table = [
        [
            r["variant"],
            f"{r['moe_tokens_per_s']:.0f}",
            f"{r['dense_tokens_per_s']:.0f}",
            f"{r['moe_over_dense_time']:.2f}x",
            f"{r['active_experts']:.2f}",
        ]
        for r in data["rows"]
    ]
    lines += _table(
        ["variant", "MoE tok/s", "dense tok/s", "time MoE / dense", "active experts"], table
    )
    _bars(
        plot,
        [r["variant"].split(" (")[0] for r in data["rows"]],
        {"MoE / dense": [r["moe_over_dense_time"] for r in data["rows"]]},
        "step time / dense",
    )
    return lines + ["", f"![train step over dense]({plot.name})"]


def _serve(data: dict, plot: pathlib.Path) -> list[str]:
    load = data["load_test"]
    lines = [
        "## Serving throughput and latency",
        "",
        "`bench/serve.py`: the continuous-batching engine on the tiny LM with random weights.",
        "",
        "Decode (every slot busy; step time includes host work):",
        "",
    ]
    decode = data["decode"]
    lines += _table(
        ["slots", "step ms", "tokens/s", "tokens/s over 1 slot"],
        [
            [
                b,
                f"{r['step_ms']:.2f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['tokens_per_s'] / decode['1']['tokens_per_s']:.2f}x",
            ]  # fmt: skip
            for b, r in decode.items()
        ],
    )
    lines += ["", "Prefill of one prompt:", ""]
    lines += _table(
        ["prompt tokens", "ms", "tokens/s"],
        [
            [r["prompt_tokens"], f"{r['ms']:.2f}", f"{r['tokens_per_s']:.0f}"]
            for r in data["prefill"]
        ],
    )
    kinds = [k for k in ("raw", "openai") if k in load]
    lines += [
        "",
        "HTTP load test (streaming clients over real HTTP, in a process of their own; `raw`: "
        "asyncio + httpx reading the server-sent events, `openai`: the official client):",
        "",
    ]
    lines += _table(
        ["clients", "tokens/s", "time to first token p50 / p95 ms", "latency p50 / p95 ms"],
        [
            [
                f"{kind} {name} x{r['clients']}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f}",
                f"{r['latency_p50_ms']:.0f} / {r['latency_p95_ms']:.0f}",
            ]  # fmt: skip
            for kind in kinds
            for name, r in ((n, load[kind][n]) for n in ("sequential", "concurrent"))
        ],
    )
    speedups = ", ".join(f"{load[kind]['speedup']:.1f}x ({kind})" for kind in kinds)
    lines += [
        "",
        f"Concurrent clients get {speedups} the tokens/s of one at a time (the median of the "
        f"per-round ratios); compilations after warm-up: {load['compilations_after_warmup']}.",
        "",
        "Decode per router (adaptive routers held at their calibrated active experts):",
        "",
    ]
    lines += _table(
        ["router", "batch", "step ms", "active experts / token", "expert MB read / step"],
        [
            [
                r["router"],
                r["batch"],
                f"{r['step_ms']:.2f}",
                f"{r['active_experts']:.2f}",
                f"{r['expert_mb_per_step']:.2f}",
            ]  # fmt: skip
            for r in data["routers"]
        ],
    )
    fig, ax = plt.subplots(figsize=(5, 3))
    batches = list(decode)
    ax.plot([int(b) for b in batches], [decode[b]["tokens_per_s"] for b in batches], "o-")
    ax.set_xlabel("decode slots")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return lines + ["", f"![decode tokens/s per slot count]({plot.name})"]


def _expert_parallel(data: dict, plot: pathlib.Path) -> list[str]:
    meta = data["meta"]
    lines = [
        "## Expert parallelism",
        "",
        f"`bench/expert_parallel.py`: mesh {meta['mesh']} over {meta['devices']} "
        f"{meta['backend']} devices, T={meta['args']['tokens']}; bytes sent per token per MoE "
        "layer (forward) and the forward+backward time with experts split over `expert` "
        "(all-to-all) relative to replicated experts.",
        "",
    ]
    lines += _table(
        ["router", "active", "buffer B/token", "payload B/token", "split / replicated time"],
        [
            [
                r["router"],
                f"{r['active_experts']:.2f}",
                f"{r['buffer_bytes']:.0f}",
                f"{r['payload_bytes']:.0f}",
                f"{r['ep_step_s'] / r['replicated_step_s']:.2f}x",
            ]  # fmt: skip
            for r in data["rows"]
        ],
    )
    _bars(
        plot,
        [r["router"].split(" (")[0] for r in data["rows"]],
        {"split / replicated": [r["ep_step_s"] / r["replicated_step_s"] for r in data["rows"]]},
        "time / replicated",
    )
    return lines + ["", f"![expert-parallel over replicated]({plot.name})"]


def _kernels(data: dict, plot: pathlib.Path) -> list[str]:
    rows = [r for r in data["rows"] if "vs_dense" in r]
    lines = [
        "## Pallas kernels against the dense-matmul ceiling",
        "",
        f"`bench/kernels.py` on {data['meta']['device']}: TFLOP/s of each kernel and its ratio to "
        "a dense `jnp.dot` of the same FLOPs on this device (1.00x = the ceiling).",
        "",
    ]
    lines += _table(
        ["shape", "op", "variant", "ms", "TFLOP/s", "of dense"],
        [
            [
                r["shape"],
                r["op"],
                f"`{r['variant']}`",
                f"{r['ms']:.3f}",
                f"{r['tflops']:.1f}",
                f"{r['vs_dense']:.2f}x",
            ]  # fmt: skip
            for r in rows
        ],
    )
    kernel = [r for r in rows if r["variant"] != "dense"]
    _bars(
        plot,
        [f"{r['shape']}\n{r['op']}\n{r['variant']}" for r in kernel],
        {"of dense": [r["vs_dense"] for r in kernel]},
        "TFLOP/s / dense",
    )
    return lines + ["", f"![kernels over dense]({plot.name})"]


SECTIONS = {
    "moe_layer": _moe_layer,
    "moe_layer_adaptive": _moe_layer_adaptive,
    "grouped_matmul": _grouped_matmul,
    "train_step": _train_step,
    "serve": _serve,
    "expert_parallel": _expert_parallel,
    "kernels": _kernels,
}


def write_page(record: dict, results: pathlib.Path, page: pathlib.Path) -> None:
    """Writes `page` and its PNGs (`benchmarks_<name>.png` beside it) from the run `record` and
    the JSON files in `results`."""
    m = record["machine"]
    page.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    load = record.get("load_average_after")
    flag = "" if record["mode"] == "full" else f" --{record['mode']}"
    lines = [
        "# Benchmarks",
        "",
        f"One run of `python bench/run_all.py{flag}`"
        f" on {when}. Every number is a ratio (or a rate) measured in that one run, with the "
        "variants it compares timed interleaved in one process. Rerun it on your machine: "
        "absolute times depend on it, and small shapes favour fixed overheads.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['cpu_count']} cores) |",
        f"| devices | {m['device_count']} x {m['device_kind']} ({m['backend']}) |",
        f"| jax / jaxlib | {m['jax']} / {m['jaxlib']} |",
        f"| Python | {m['python']} |",
        f"| load average (1, 5, 15 min) before / after | "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])} / "
        f"{', '.join(f'{x:.1f}' for x in load or [])} |",
        f"| total time | {record.get('total_seconds', 0):.0f} s |",
        "",
    ]
    if record.get("note"):
        lines += ["!!! note", "", f"    {record['note']}", ""]
    for name, section in SECTIONS.items():
        status = record["benchmarks"].get(name)
        if status is None:
            continue
        data = _load(results, name) if status["status"] == "ok" else None
        if data is None:
            text = status["status"]
            lines += [f"## `bench/{name}.py`", "", f"{text[0].upper()}{text[1:]}.", ""]
            continue
        lines += section(data, page.parent / f"benchmarks_{name}.png") + [""]
    page.write_text("\n".join(lines))
