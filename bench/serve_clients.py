"""Streaming load-test clients of `bench/serve.py`, run in a process of their own so that their
Python work does not share the server's interpreter lock.

Each round sends the same requests twice, one at a time and then all at once, with one of two
clients: `raw` (asyncio + httpx, reading the server-sent events as lines, the lightest client) or
`openai` (the official `AsyncOpenAI` client, which parses every chunk into its types). It prints
one JSON line per round and mode: wall seconds, and per request its time to first text, latency
and completion tokens (from the usage chunk).

    python bench/serve_clients.py URL --model jmoe --prompts prompts.json --client raw --rounds 9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import openai


async def raw_request(http: httpx.AsyncClient, url: str, prompt, max_tokens: int) -> dict:
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"text": ""' not in line:
                first = time.perf_counter() - start
            if '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return dict(ttft=first, latency=time.perf_counter() - start, tokens=tokens)


async def openai_request(client: openai.AsyncOpenAI, model: str, prompt, max_tokens: int) -> dict:
    start, first, tokens = time.perf_counter(), None, 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return dict(ttft=first, latency=time.perf_counter() - start, tokens=tokens)


async def rounds(url: str, model: str, jobs: list, client: str, n_rounds: int) -> None:
    limits = httpx.Limits(max_connections=len(jobs) + 1, max_keepalive_connections=len(jobs) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        api = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="none", max_retries=0, http_client=http
        )

        def request(prompt, max_tokens):
            if client == "raw":
                return raw_request(http, url, prompt, max_tokens)
            return openai_request(api, model, prompt, max_tokens)

        await asyncio.gather(*(request(*job) for job in jobs[:2]))  # warm the connections
        for r in range(n_rounds):
            for mode in ("sequential", "concurrent"):
                start = time.perf_counter()
                if mode == "concurrent":
                    results = await asyncio.gather(*(request(*job) for job in jobs))
                else:
                    results = [await request(*job) for job in jobs]
                wall = time.perf_counter() - start
                print(json.dumps(dict(round=r, mode=mode, wall=wall, requests=results)), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--model", required=True, help="the served model id")
    parser.add_argument("--prompts", required=True, help="JSON list of [prompt, max_tokens]")
    parser.add_argument("--client", choices=("raw", "openai"), default="raw")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with open(args.prompts) as f:
        jobs = json.load(f)
    asyncio.run(rounds(args.url, args.model, jobs, args.client, args.rounds))


if __name__ == "__main__":
    main()
