"""Chat templates: Hugging Face's Jinja format, rendered in a sandbox as `transformers` does."""

from __future__ import annotations

import functools

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed on the given messages (its own `raise_exception`, or a bad template)."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of `messages` (`[{"role": ..., "content": ...}]`) under `template`.

    Raises:
      ChatTemplateError: when the template cannot be parsed or refuses the messages.
    """
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed: {e}") from None


def special_token_text(tokenizer, token_id: int | None) -> str:
    """The text of a special token (empty when the tokenizer has no text for it)."""
    inner = getattr(tokenizer, "tokenizer", None)  # a Hugging Face `tokenizers.Tokenizer`
    if inner is None or token_id is None:
        return ""
    return inner.id_to_token(token_id) or ""
