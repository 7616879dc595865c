"""The OpenAI-compatible request bodies (pydantic, strict types) and response pieces.

Fields the OpenAI API has but the engine does not implement are accepted only at their neutral
value (`n=1`, no penalties, no `logit_bias`, no `suffix`), so a client never gets a silently
different result. `top_k` (a vLLM extension) takes -1 for "no limit" as vLLM does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jmoe.serve.outputs import Completion, TokenLogprob
from jmoe.serve.sampling import MAX_LOGPROBS

PromptField = str | list[str] | list[int] | list[list[int]]
# What a field of several accepted types takes, for errors where no type matched.
FIELD_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
}


class APIError(Exception):
    """An error answered with the OpenAI error object and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, **kind):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind.get("kind", "invalid_request_error")
        self.code = kind.get("code")

    def body(self) -> dict:
        return error_body(self.message, self.param, self.kind, self.code)


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The request body as `model` (strict JSON types), or an `APIError` naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if not loc:
            raise APIError(400, f"the request body must be a JSON object: {first['msg']}") from None
        param = loc[0]
        if param in FIELD_TYPES and len(loc) > 1 and first["type"] != "missing":
            message = f"invalid '{param}': must be {FIELD_TYPES[param]}"
        else:
            message = f"invalid '{'.'.join(loc)}': {first['msg']}"
        raise APIError(400, message, param) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to a value the engine does not implement: `(field, why)`."""
        checks = [
            ("n", self.n == 1, "only n=1 is supported (send several requests instead)"),
            ("presence_penalty", self.presence_penalty == 0, "penalties are not supported"),
            ("frequency_penalty", self.frequency_penalty == 0, "penalties are not supported"),
            ("logit_bias", not self.logit_bias, "logit_bias is not supported"),
        ]
        return next(((name, why) for name, ok, why in checks if not ok), None)

    def effective_top_k(self) -> int | None:
        return None if self.top_k in (None, -1, 0) else self.top_k


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: PromptField
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` (text messages; no tools, no log-probabilities)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "log-probabilities are supported on /v1/completions only"
        return super().unsupported()


def error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(completions: list[Completion]) -> dict:
    prompt = sum(len(c.prompt_ids) for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


def jmoe_stats(completions: list[Completion]) -> dict:
    """Mean experts run per MoE layer for each generated (and each prompt) token."""

    def mean(pairs):
        pairs = [(v, n) for v, n in pairs if v is not None and n]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    return {
        "active_experts_per_token": mean((c.active_experts, len(c.token_ids)) for c in completions),
        "prompt_active_experts_per_token": mean(
            (c.prompt_active_experts, len(c.prompt_ids)) for c in completions
        ),
    }


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The completions API's `logprobs` object for `entries` (text offsets from `offset`)."""
    tokens = [tokenizer.decode([e.token_id]) for e in entries]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            None if e.logprob is None else {tokenizer.decode([i]): lp for i, lp in e.top}
            for e in entries
        ],
        "text_offset": offsets,
    }
