"""What the engine hands back: per-request updates, finished completions, and its refusals."""

from __future__ import annotations

import dataclasses


class QueueFullError(RuntimeError):
    """The waiting queue has no room for the request(s)."""


class ClosedError(RuntimeError):
    """The scheduler is shutting down and accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model and the most likely alternatives."""

    token_id: int
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request.

    Attributes:
      text: the generated text (cut before a stop string).
      token_ids: the generated ids (the stop token or the one that completed a stop string
        included).
      finish_reason: "stop" (stop token or string), "length" (max_tokens), "cancelled" or
        "error" (the model step failed; see `error`).
      prompt_ids: the prompt's ids.
      logprobs: per generated token, when requested (`SamplingParams.logprobs`).
      prompt_logprobs: per prompt token, when requested with `echo`.
      active_experts: mean experts run per MoE layer for the tokens that produced the
        generated ones (the last prompt token, then each fed-back token).
      prompt_active_experts: the same mean over the prompt tokens.
      time_to_first_token, latency: seconds from submission (None if never reached).
      error: what failed, with finish reason "error".
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    prompt_logprobs: tuple[TokenLogprob, ...] | None
    active_experts: float | None
    prompt_active_experts: float | None
    time_to_first_token: float | None
    latency: float
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Update:
    """Progress of one request: newly final text and tokens, and the result once finished
    (the first update of a scored prompt carries the prompt's log-probabilities)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    completion: Completion | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
