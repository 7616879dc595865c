"""Chat templates: Hugging Face's Jinja format, rendered in a sandbox as `transformers` does.

The environment matches the one chat templates are written for: an immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`{% break %}`), the
`{% generation %}` block (it marks assistant text for training masks; here it renders its body),
the globals `raise_exception(message)` and `strftime_now(format)`, and a `tojson` filter that
keeps non-ASCII text as it is and takes `indent`, `separators` and `sort_keys`. A template sees
`messages`, `tools` and `documents` (None), `add_generation_prompt` and the tokenizer's special
tokens as text (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed on the given messages (its own `raise_exception`, or a bad template)."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` escapes HTML characters and sorts keys; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %} ... {% endgeneration %}`: renders the body unchanged."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **variables,
) -> str:
    """The prompt text of `messages` (`[{"role": ..., "content": ...}]`) under `template`.

    Args:
      template: a Hugging Face chat template (Jinja source).
      messages: the conversation.
      bos_token, eos_token: the tokenizer's special tokens as text.
      add_generation_prompt: end with the opening of an assistant turn.
      **variables: further template variables (other special tokens such as `pad_token`,
        `tools`, `documents`, or a template's own switches).

    Raises:
      ChatTemplateError: when the template cannot be parsed or refuses the messages.
    """
    context = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **context,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed: {e}") from None


def template_tokens(tokenizer) -> dict[str, str]:
    """The special tokens a chat template sees, as text (`bos_token`, `eos_token`, ...).

    A Hugging Face checkpoint's tokenizer names its own (`special_tokens`); any other gives its
    end-of-text token's text, when it has one.
    """
    special = getattr(tokenizer, "special_tokens", None)
    if special is not None:
        return dict(special)
    inner = getattr(tokenizer, "tokenizer", None)  # a Hugging Face `tokenizers.Tokenizer`
    if inner is None:
        return {}
    return {"eos_token": inner.id_to_token(tokenizer.eos_id) or ""}
