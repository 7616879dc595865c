"""Requests of one HTTP call on the event loop, and their server-sent event streams.

The engine's thread hands each `Update` to the event loop (`call_soon_threadsafe`); a
`Submission` collects them for a plain response, or the stream generators turn them into
OpenAI-shaped chunks. Leaving early (a client that disconnects, or a stream that is closed)
cancels the requests still running, which frees their decode slots.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable

from jmoe.serve import protocol
from jmoe.serve.engine import Engine
from jmoe.serve.outputs import Completion, Update
from jmoe.serve.sampling import SamplingParams


class Submission:
    """Submits `prompts` to `engine` and receives their updates as `(index, Update)`.

    Args:
      engine: the running engine.
      prompts: token ids per prompt (checked by the engine).
      params: their sampling parameters (one for all, or one per prompt).
      on_done: called with each `Completion` (on the engine's thread; thread-safe please).
    """

    def __init__(
        self,
        engine: Engine,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_done: Callable[[Completion], None],
    ):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.engine, self.pending = engine, len(prompts)

        def push(index: int, update: Update) -> None:  # on the engine's thread
            if update.completion is not None:
                on_done(update.completion)  # even after the client left
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))

        listeners = [functools.partial(push, i) for i in range(len(prompts))]
        self.requests = engine.submit(prompts, params, listeners)

    async def next(self, timeout: float | None = None) -> tuple[int, Update]:
        """The next update of any of the requests (`TimeoutError` after `timeout` seconds)."""
        index, update = await asyncio.wait_for(self.queue.get(), timeout)
        if update.completion is not None:
            self.pending -= 1
        return index, update

    async def collect(self, is_disconnected: Callable) -> list[Completion] | None:
        """Every completion, in order; None (after cancelling them) if the client left."""
        completions: list[Completion | None] = [None] * len(self.requests)
        while self.pending:
            try:
                index, update = await self.next(timeout=0.5)
            except TimeoutError:
                if await is_disconnected():
                    self.cancel()
                    return None
                continue
            if update.completion is not None:
                completions[index] = update.completion
        return completions

    def cancel(self) -> None:
        """Cancels the requests that have not finished."""
        for request in self.requests:
            if not request.done.is_set():
                self.engine.cancel(request)


def sse(payload: dict | str) -> str:
    """One server-sent event (`data: ...`)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_completions(
    run: Submission,
    head: dict,
    prompt_texts: list[str],
    echo: bool,
    include_usage: bool,
    choices_per_prompt: int = 1,
) -> AsyncIterator[str]:
    """The `/v1/completions` event stream: text deltas per choice, the finish reason (with the
    `jmoe` statistics) in a choice's last chunk, optionally a usage chunk, then `[DONE]`.
    `prompt_texts` has one entry per choice (each prompt's `choices_per_prompt` in a row)."""
    tokenizer = run.engine.tokenizer
    done: list[Completion | None] = [None] * len(prompt_texts)
    try:
        if echo:
            for i, text in enumerate(prompt_texts):
                choice = dict(index=i, text=text, logprobs=None, finish_reason=None)
                yield sse(dict(head, choices=[choice]))
        while run.pending:
            i, update = await run.next()
            entries = list(update.prompt_logprobs or ()) if echo else []
            entries += update.logprobs
            c = update.completion
            if not (update.text or entries or c):
                continue
            choice = dict(
                index=i,
                text=update.text,
                logprobs=protocol.completion_logprobs(tokenizer, entries) if entries else None,
                finish_reason=None if c is None else c.finish_reason,
            )
            chunk = dict(head, choices=[choice])
            if c is not None:
                done[i] = c
                chunk["jmoe"] = protocol.jmoe_stats([c])
            yield sse(chunk)
        if include_usage:
            yield sse(
                dict(
                    head,
                    choices=[],
                    usage=protocol.usage(done, choices_per_prompt),
                    jmoe=protocol.jmoe_stats(done),
                )
            )
        yield sse("[DONE]")
    finally:
        run.cancel()


async def stream_chat(run: Submission, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """The `/v1/chat/completions` event stream (`chat.completion.chunk` deltas, per choice)."""
    head = dict(head, object="chat.completion.chunk")
    done: list[Completion | None] = [None] * len(run.requests)
    try:
        for i in range(len(run.requests)):
            first = dict(index=i, delta=dict(role="assistant", content=""), finish_reason=None)
            yield sse(dict(head, choices=[first]))
        while run.pending:
            i, update = await run.next()
            c = update.completion
            if not update.text and c is None:
                continue
            choice = dict(
                index=i,
                delta=dict(content=update.text) if update.text else {},
                finish_reason=None if c is None else c.finish_reason,
            )
            chunk = dict(head, choices=[choice])
            if c is not None:
                done[i] = c
                chunk["jmoe"] = protocol.jmoe_stats([c])
            yield sse(chunk)
        if include_usage:
            yield sse(dict(head, choices=[], usage=protocol.usage(done, len(done))))
        yield sse("[DONE]")
    finally:
        run.cancel()
