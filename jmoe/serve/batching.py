"""Continuous batching: requests wait in a queue, take one of a fixed number of decode slots,
and leave the moment they finish.

Each `Scheduler.step()` first admits waiting requests into free slots (one prefill each, which
also draws their first token), then dispatches one decode step over all slots and, while the
device runs it, reads and hands out the tokens of the step dispatched before (a step takes its
input tokens from the device, so it need not wait for the host). A finished request frees its
slot at once, so a long request never holds short ones back, and a new one joins between two
decode steps; a request that stops (a stop token or string) has had one more step run for it,
whose token is dropped. Prompts are padded to a few bucket lengths, a decode step reads the
cache up to the bucket above its furthest row, and a lone request decodes its own slot only, so
nothing recompiles once each of these shapes has run (`Engine.warmup`).

Requests report progress through an optional listener, called on the scheduler's thread with
each `Update` (new text and tokens, and the final `Completion`).
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from jmoe.serve.outputs import ClosedError, Completion, QueueFullError, TokenLogprob, Update
from jmoe.serve.sampling import SamplingParams
from jmoe.serve.steps import ModelSteps
from jmoe.serve.text import TextStream


class Request:
    """One generation request and its progress (made and queued by `Engine.submit`)."""

    def __init__(self, prompt_ids, params: SamplingParams, tokenizer, listener=None):
        self.prompt_ids = tuple(prompt_ids)
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.listener: Callable[[Update], None] | None = listener
        self.stream = TextStream(tokenizer, params.stop, self.prompt_ids)
        self.stop_ids = {*tokenizer.eos_ids, *params.stop_token_ids}
        self.output_ids: list[int] = []
        self.in_flight = 0  # tokens of dispatched decode steps not read yet
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.active_sum = 0.0
        self.prompt_active: float | None = None
        self.slot: int | None = None
        self.cancelled = False
        self.error: str | None = None
        self.completion: Completion | None = None
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._row: dict | None = None

    def sampling_row(self) -> dict:
        """This request's sampling parameters as the arrays of one batch row."""
        if self._row is None:
            self._row = self._make_row()
        return self._row

    def _make_row(self) -> dict:
        p = self.params
        return dict(
            temperature=np.float32(p.temperature),
            top_k=np.int32(p.top_k or 0),
            top_p=np.float32(p.top_p),
            seed=np.uint32(self.seed),
            presence=np.float32(p.presence_penalty),
            frequency=np.float32(p.frequency_penalty),
        )


@dataclasses.dataclass
class _Launch:
    """A dispatched decode step: its device outputs and the request of each row it drew for."""

    out: dict
    rows: list[tuple[int, Request]]
    start: float


def _top(ids, logprobs, n: int) -> tuple[tuple[int, float], ...]:
    return tuple((int(i), float(lp)) for i, lp in zip(ids[:n], logprobs[:n], strict=True))


class Scheduler:
    """Queue, slots and the step loop (see the module docstring).

    Args:
      steps: the compiled model steps (owns the KV cache of `steps.num_slots` rows).
      tokenizer: decodes generated ids; its `eos_ids` end a completion.
      buckets: ascending prompt bucket lengths; the last is the longest prompt.
      cache_buckets: ascending cache lengths a decode step may read; the last is the context.
      max_queue: most requests waiting for a slot (`submit` raises `QueueFullError` beyond).
    """

    def __init__(
        self,
        steps: ModelSteps,
        tokenizer,
        buckets: tuple[int, ...],
        cache_buckets: tuple[int, ...],
        max_queue: int,
    ):
        self.steps = steps
        self.tokenizer = tokenizer
        self.buckets = buckets
        self.cache_buckets = cache_buckets
        self.max_queue = max_queue
        self.slots: list[Request | None] = [None] * steps.num_slots
        # Each slot's sampling parameters: its request's, or the defaults in a free slot (an
        # idle row with a top-k or top-p would make every row of a step sort its logits).
        self._idle_row = Request([0], SamplingParams(), tokenizer).sampling_row()
        self._rows = {k: np.full(steps.num_slots, v) for k, v in self._idle_row.items()}
        self._in_flight: _Launch | None = None  # the decode step dispatched and not read yet
        self._last_read = 0.0
        self._waiting: collections.deque[Request] = collections.deque()
        self._wakeup = threading.Condition()
        self._accepting = True
        self._running = False
        self._thread: threading.Thread | None = None
        # the last decode step read: its seconds (since the step before was read, or since its
        # dispatch if later: host work included), busy rows and (layer, expert) weight sets read
        self.last_decode: dict[str, float] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)

    # ------------------------------------------------------------------------- the queue

    def submit(self, requests: list[Request], limit: bool = True) -> None:
        """Queues `requests` together (all or none); `limit=False` ignores `max_queue`."""
        with self._wakeup:
            if not self._accepting:
                raise ClosedError("the server is shutting down and accepts no new requests")
            if limit and len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); "
                    "retry later"
                )
            self._waiting.extend(requests)
            self._wakeup.notify()

    def cancel(self, request: Request) -> None:
        """Ends `request` (its slot is freed before the next decode step)."""
        request.cancelled = True
        with self._wakeup:
            self._wakeup.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds of decoding."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

    @property
    def running(self) -> bool:
        """Whether the background step loop runs."""
        return self._thread is not None

    def has_work(self) -> bool:
        return bool(self._waiting) or self.active_slots > 0 or self._in_flight is not None

    # -------------------------------------------------------------------------- stepping

    def step(self) -> None:
        """Drops cancelled requests, admits waiting ones into free slots, dispatches one decode
        step, then reads the step dispatched before it."""
        with self._wakeup:
            cancelled = [r for r in self._waiting if r.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        cancelled += [r for r in self.slots if r is not None and r.cancelled]
        for request in cancelled:
            self._finish(request, "cancelled")
        while None in self.slots:
            with self._wakeup:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            self._admit(request, self.slots.index(None))
        launch = self._dispatch()
        if self._in_flight is not None:
            self._read(self._in_flight)
        self._in_flight = launch

    def _admit(self, request: Request, slot: int) -> None:
        params = request.params
        scoring = params.echo and params.logprobs is not None
        if params.max_tokens == 0 and not scoring:
            self._finish(request, "length")
            return
        request.slot, self.slots[slot] = slot, request
        self._set_row(slot, request.sampling_row())
        n = len(request.prompt_ids)
        bucket = next(b for b in self.buckets if b >= n)
        out = self.steps.prefill(
            slot, list(request.prompt_ids), bucket, request.sampling_row(), scoring
        )
        request.prompt_active = float(out["prompt_active_experts"])
        if scoring:
            first = TokenLogprob(request.prompt_ids[0], None)
            request.prompt_logprobs = [first] + [
                TokenLogprob(
                    request.prompt_ids[i],
                    float(out["prompt_logprobs"][i]),
                    _top(out["prompt_top_ids"][i], out["prompt_top_logprobs"][i], params.logprobs),
                )
                for i in range(1, n)
            ]
        scored = tuple(request.prompt_logprobs) if scoring else None
        if params.max_tokens == 0:
            self._finish(request, "length", Update("", (), (), prompt_logprobs=scored))
            return
        self._accept(request, int(out["token"]), float(out["active_experts"]), out, None, scored)

    def _set_row(self, slot: int, row: dict) -> None:
        for key, value in row.items():
            self._rows[key][slot] = value

    def _dispatch(self) -> _Launch | None:
        """Dispatches a decode step for every running request that needs another token."""
        busy = [
            slot
            for slot, r in enumerate(self.slots)
            if r is not None and len(r.output_ids) + r.in_flight < r.params.max_tokens
        ]
        if not busy:
            return None
        # one running request decodes its slot alone; otherwise every slot runs
        first, n = (busy[0], 1) if len(busy) == 1 else (0, self.steps.num_slots)
        positions, counter = np.zeros(n, np.int32), np.zeros(n, np.int32)
        active = np.zeros(n, bool)
        rows = []
        for slot in busy:
            request, row = self.slots[slot], slot - first
            drawn = len(request.output_ids) + request.in_flight  # tokens drawn or on their way
            positions[row] = len(request.prompt_ids) + drawn - 1
            counter[row], active[row] = drawn, True
            request.in_flight += 1
            rows.append((row, request))
        sampling = {k: v[first : first + n].copy() for k, v in self._rows.items()}
        sampling.update(active=active, counter=counter)
        length = next(b for b in self.cache_buckets if b > positions.max())
        start = time.perf_counter()
        return _Launch(self.steps.decode(positions, sampling, length, first), rows, start)

    def _read(self, launch: _Launch) -> None:
        """Waits for a dispatched step and hands each still running request its token."""
        wanted = ["token", "active_experts", "experts_read"]
        if any(request.params.logprobs is not None for _, request in launch.rows):
            wanted += ["logprob", "top_ids", "top_logprobs"]
        out = jax.device_get({key: launch.out[key] for key in wanted})
        now = time.perf_counter()
        self.last_decode = dict(
            seconds=now - max(launch.start, self._last_read),
            rows=len(launch.rows),
            experts_read=int(out["experts_read"]),
        )
        self._last_read = now
        self._recent.append((now, len(launch.rows)))
        tokens, active = out["token"].tolist(), out["active_experts"].tolist()
        for row, request in launch.rows:
            request.in_flight -= 1
            if request.completion is None:  # else it stopped or was cancelled meanwhile
                self._accept(request, tokens[row], active[row], out, row)

    def _accept(
        self, request: Request, token: int, active: float, out: dict, row: int | None, scored=None
    ) -> None:
        """Appends `token`, drawn for `request` (row `row` of a decode step's outputs `out`, or
        a prefill's, with the prompt's log-probabilities `scored`)."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.output_ids.append(token)
        request.active_sum += active
        logprobs = ()
        if request.params.logprobs is not None:
            pick = (lambda a: a) if row is None else (lambda a: a[row])
            top = _top(pick(out["top_ids"]), pick(out["top_logprobs"]), request.params.logprobs)
            logprobs = (TokenLogprob(token, float(pick(out["logprob"])), top),)
            request.logprobs.extend(logprobs)
        text, reason = "", None
        if token in request.stop_ids:
            reason = "stop"
        else:
            text, stopped = request.stream.push(token)
            reason = "stop" if stopped else None
        if reason is None and len(request.output_ids) >= request.params.max_tokens:
            reason = "length"
        update = Update(text, (token,), logprobs, prompt_logprobs=scored)
        if reason is None:
            self._notify(request, update)
        else:
            self._finish(request, reason, update)

    def _finish(self, request: Request, reason: str, last: Update | None = None) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
            self._set_row(request.slot, self._idle_row)
            request.slot = None
        now = time.perf_counter()
        n = len(request.output_ids)
        completion = Completion(
            text=request.stream.text,
            token_ids=tuple(request.output_ids),
            finish_reason=reason,
            prompt_ids=request.prompt_ids,
            logprobs=tuple(request.logprobs) if request.params.logprobs is not None else None,
            prompt_logprobs=(
                tuple(request.prompt_logprobs) if request.prompt_logprobs is not None else None
            ),
            active_experts=request.active_sum / n if n else None,
            prompt_active_experts=request.prompt_active,
            time_to_first_token=(
                request.first_token_at - request.submitted_at if request.first_token_at else None
            ),
            latency=now - request.submitted_at,
            error=request.error,
        )
        rest = request.stream.finish()
        last = last or Update("", (), ())
        request.completion = completion
        self._notify(
            request, dataclasses.replace(last, text=last.text + rest, completion=completion)
        )
        request.done.set()

    def _notify(self, request: Request, update: Update) -> None:
        if request.listener is None:
            return
        try:
            request.listener(update)
        except Exception:  # a listener that fails (say, its client left) ends its request only
            request.cancelled = True

    # ------------------------------------------------------------------------ the loop

    def run_until_idle(self) -> None:
        """Steps in the calling thread until no request waits or runs."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Runs the step loop in a background thread (for a server)."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="jmoe-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while self._running and not self.has_work():
                    self._wakeup.wait()
                if not self._running and not self.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # the step failed: end every request with the error
                self.fail_all(e)

    def fail_all(self, error: Exception) -> None:
        """Ends every waiting and running request with finish reason "error"."""
        with self._wakeup:
            failed = [*self._waiting, *filter(None, self.slots)]
            self._waiting.clear()
        self._in_flight = None
        for request in failed:
            request.error = f"{type(error).__name__}: {error}"
            self._finish(request, "error")

    def stop(self, cancel: bool = False) -> None:
        """Stops accepting requests; finishes (or, with `cancel`, cancels) the ones in flight
        and waits for the loop to end. Once it returns, the scheduler is idle and accepts
        requests again (stepped by `run_until_idle`, or by a new `start`)."""
        with self._wakeup:
            self._accepting = False
            self._running = False
            if cancel:
                for request in [*self._waiting, *filter(None, self.slots)]:
                    request.cancelled = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif cancel:
            self.run_until_idle()
        with self._wakeup:
            self._accepting = True
