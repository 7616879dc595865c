"""The OpenAI-compatible request bodies (pydantic, strict types) and response pieces.

Every field a body may carry either works or is refused: an unknown field is a 400 naming it,
and fields the OpenAI API has but the engine does not implement (`logit_bias`, `suffix`, `tools`,
...) are accepted only at their neutral value, so a client never gets a silently different
result. `top_k` and `stop_token_ids` (vLLM extensions) are implemented; `top_k` takes -1 for
"no limit" as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jmoe.serve.outputs import Completion, TokenLogprob
from jmoe.serve.sampling import MAX_LOGPROBS

MAX_CHOICES = 16  # most choices per prompt (`n`)

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
        if first["type"] == "extra_forbidden":
            message = (
                f"unknown field '{'.'.join(loc)}': this server does not implement it (remove it)"
            )
        elif param in FIELD_TYPES and len(loc) > 1 and first["type"] != "missing":
            message = f"invalid '{param}': must be {FIELD_TYPES[param]}"
        else:
            message = f"invalid '{'.'.join(loc)}': {first['msg']}"
        raise APIError(400, message, param) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="forbid")

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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the client's own bookkeeping: no effect

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to a value the engine does not implement: `(field, why)`."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

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
        if self.best_of not in (None, self.n):
            return "best_of", (
                f"best_of={self.best_of} is not supported: only best_of equal to n={self.n} "
                "(every choice generated is returned)"
            )
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    """One part of a message's content: `{"type": "text", "text": ...}` is the only kind a
    text-only model reads; other kinds are refused by `ChatMessage.text`."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]
    name: str | None = None  # passed to the chat template with the message

    def text(self, index: int) -> str:
        """The content as one string: text parts joined with newlines.

        Raises:
          APIError: for a part that is not text (message `index`, for the error).
        """
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text":
                message = (
                    f"messages[{index}].content[{j}] has type {part.type!r}: this model is "
                    "text-only and reads content parts of type 'text' only"
                )
                raise APIError(400, message, "messages")
            if part.text is None:
                message = f"messages[{index}].content[{j}] is a text part without 'text'"
                raise APIError(400, message, "messages")
            texts.append(part.text)
        return "\n".join(texts)

    def template_dict(self, index: int) -> dict[str, str]:
        """The message as the chat template reads it (`role`, `content` and any `name`)."""
        out = {"role": self.role, "content": self.text(index)}
        if self.name is not None:
            out["name"] = self.name
        return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]  # JSON modes would need constrained decoding


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` (text messages; no tools, no log-probabilities)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "log-probabilities are supported on /v1/completions only"
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported (there are no tools)"
        return super().unsupported()


def error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(completions: list[Completion], choices_per_prompt: int = 1) -> dict:
    """Token counts; a prompt's tokens count once however many choices it has (`n`)."""
    prompt = sum(len(c.prompt_ids) for c in completions[::choices_per_prompt])
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
