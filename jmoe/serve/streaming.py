"""Requests of one HTTP call on the event loop, and their server-sent event streams.

The engine's thread hands each `Update` to the event loop through a `Mailbox`, which wakes the
loop once for all the updates posted before it runs (a decode step's tokens of every stream),
not once per token; a `Submission` collects them for a plain response, or the stream generators
turn them into OpenAI-shaped chunks, writing all the chunks that are ready at once. Leaving
early (a client that disconnects, or a stream that is closed) cancels the requests still
running, which frees their decode slots.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from jmoe.serve import protocol
from jmoe.serve.engine import Engine
from jmoe.serve.outputs import Completion, Update
from jmoe.serve.sampling import SamplingParams


class Mailbox:
    """Hands `(queue, item)` pairs from other threads to the queues of one event loop, with one
    wake-up of the loop (`call_soon_threadsafe`) for everything posted before it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._posted: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item) -> None:
        """Puts `item` into `queue` on the loop (callable from any thread)."""
        with self._lock:
            self._posted.append((queue, item))
            if len(self._posted) > 1:  # a delivery is already scheduled
                return
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        for queue, item in posted:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary()
)


def mailbox() -> Mailbox:
    """The running event loop's `Mailbox`."""
    loop = asyncio.get_running_loop()
    if loop not in _mailboxes:
        _mailboxes[loop] = Mailbox(loop)
    return _mailboxes[loop]


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
        post = mailbox().post
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.engine, self.pending = engine, len(prompts)

        def push(index: int, update: Update) -> None:  # on the engine's thread
            if update.completion is not None:
                on_done(update.completion)  # even after the client left
            post(self.queue, (index, update))

        listeners = [functools.partial(push, i) for i in range(len(prompts))]
        self.requests = engine.submit(prompts, params, listeners)

    async def next(self, timeout: float | None = None) -> tuple[int, Update]:
        """The next update of any of the requests (`TimeoutError` after `timeout` seconds)."""
        index, update = await asyncio.wait_for(self.queue.get(), timeout)
        if update.completion is not None:
            self.pending -= 1
        return index, update

    async def ready(self) -> list[tuple[int, Update]]:
        """The next update, and every other one already delivered."""
        updates = [await self.next()]
        while not self.queue.empty():
            index, update = self.queue.get_nowait()
            self.pending -= update.completion is not None
            updates.append((index, update))
        return updates

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


async def _choice_events(
    run: Submission, head: dict, done: list, choice: Callable
) -> AsyncIterator[str]:
    """The events of `run`'s updates until it finishes, one string per wake-up: a chunk per
    update that `choice(i, update)` makes a choice of (None: nothing to send), a finished
    choice's chunk with its `jmoe` statistics and its completion recorded in `done[i]`."""
    while run.pending:
        events = []
        for i, update in await run.ready():
            if (made := choice(i, update)) is None:
                continue
            chunk = dict(head, choices=[made])
            if (c := update.completion) is not None:
                done[i] = c
                chunk["jmoe"] = protocol.jmoe_stats([c])
            events.append(sse(chunk))
        if events:
            yield "".join(events)


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

        def choice(i: int, update) -> dict | None:
            entries = list(update.prompt_logprobs or ()) if echo else []
            entries += update.logprobs
            c = update.completion
            if not (update.text or entries or c):
                return None
            return dict(
                index=i,
                text=update.text,
                logprobs=protocol.completion_logprobs(tokenizer, entries) if entries else None,
                finish_reason=None if c is None else c.finish_reason,
            )

        async for events in _choice_events(run, head, done, choice):
            yield events
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

        def choice(i: int, update) -> dict | None:
            c = update.completion
            if not update.text and c is None:
                return None
            return dict(
                index=i,
                delta=dict(content=update.text) if update.text else {},
                finish_reason=None if c is None else c.finish_reason,
            )

        async for events in _choice_events(run, head, done, choice):
            yield events
        if include_usage:
            yield sse(dict(head, choices=[], usage=protocol.usage(done, len(done))))
        yield sse("[DONE]")
    finally:
        run.cancel()
