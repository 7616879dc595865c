"""Serves a jmoe model: `python serve.py --run runs/tiny | --hf DIR [--host H] [--port P]`.

Loads the newest checkpoint of a `train.py` run directory (its config.yaml, tokenizer/ and
checkpoints/), or a Hugging Face checkpoint directory (config.json, safetensors weights,
tokenizer.json and its chat template), and serves an OpenAI-compatible HTTP API on
127.0.0.1:8000 (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
`/metrics`); the model id is the directory's name. With `--prompt TEXT` it prints one completion
(greedy unless `--temperature` is given) and exits. `--quantize int8|fp8` stores the experts
quantized before serving (`/v1/models` reports it as `expert_quantization`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from jmoe.kernels.quantization import QUANTIZATIONS
from jmoe.serve.app import serve
from jmoe.serve.engine import Engine
from jmoe.serve.sampling import InvalidRequestError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a train.py run directory, e.g. runs/tiny")
    source.add_argument("--hf", help="a Hugging Face checkpoint directory (jmoe.convert.from_hf)")
    parser.add_argument(
        "--max-seq-len", type=int, help="with --hf: context served (default: the checkpoint's)"
    )
    parser.add_argument(
        "--dtype", help="with --hf: bfloat16, float32, ... (default: the checkpoint's)"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="store the experts as int8 or fp8 with per-channel scales (about 4x less expert "
        "memory than float32; jmoe.compress.quantize)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("JMOE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $JMOE_API_KEY, else none)",
    )
    parser.add_argument("--slots", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests (then 429)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: context)")
    parser.add_argument(
        "--max-tokens-limit", type=int, help="largest max_tokens (default: context)"
    )
    parser.add_argument(
        "--offload-experts",
        action="store_true",
        help="keep the routed experts in host memory, a cache of them on the device",
    )
    parser.add_argument(
        "--expert-cache",
        help="with --offload-experts: device cache size in experts (e.g. 64) or bytes "
        "(e.g. 2GiB); default: one layer's experts",
    )
    parser.add_argument("--prompt", help="print one completion of this text and exit")
    parser.add_argument("--max-tokens", type=int, default=64, help="with --prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="with --prompt (0: greedy)")
    args = parser.parse_args(argv)
    limits = ("port", "slots", "max_queue", "max_prompt_tokens", "max_tokens_limit", "max_seq_len")
    for name in limits:
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_queue" else 1):
            parser.error(f"--{name.replace('_', '-')}={value} must be positive")
    if args.run is not None and (args.max_seq_len or args.dtype):
        parser.error("--max-seq-len and --dtype go with --hf (a run serves its own config)")
    if args.expert_cache is not None and not args.offload_experts:
        parser.error("--expert-cache sizes the cache of --offload-experts")
    options = dict(num_slots=args.slots, max_queue=args.max_queue, quantize=args.quantize)
    if args.offload_experts:
        options.update(offload_experts=True, expert_cache=args.expert_cache)
    try:
        if args.hf is not None:
            engine = Engine.from_hf(
                args.hf, dtype=args.dtype, max_seq_len=args.max_seq_len, **options
            )
        else:
            engine = Engine.from_run(args.run, **options)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.prompt is not None:
        try:
            [completion] = engine.generate(
                args.prompt, max_tokens=args.max_tokens, temperature=args.temperature
            )
        except InvalidRequestError as e:
            sys.exit(f"error: {e}")
        print(completion.text, flush=True)
        return
    kinds = sorted({d.device_kind for d in jax.devices()})
    quantized = f", {args.quantize} experts" if args.quantize else ""
    print(
        f"jax {jax.__version__} on {', '.join(kinds)}: serving {engine.name!r} "
        f"({engine.num_slots} slots, context {engine.max_seq_len}{quantized}); compiling...",
        flush=True,
    )
    engine.warmup()
    serve(
        engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
    )


if __name__ == "__main__":
    main()
