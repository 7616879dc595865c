"""A Hugging Face checkpoint's tokenizer: `tokenizer.json`, its special tokens and chat template.

A checkpoint directory holds `tokenizer.json` (the `tokenizers` library's file) and usually
`tokenizer_config.json` (special tokens, `chat_template`), `special_tokens_map.json`,
`generation_config.json` (`eos_token_id`: the ids that end a generation, one or a list) and, in
newer checkpoints, the chat template as its own file `chat_template.jinja`:

    tok = load_hf_tokenizer("checkpoints/Mixtral-8x7B-Instruct-v0.1")
    tok.encode("text")            # no special tokens (what training packs between documents)
    tok.encode_prompt("text")     # the tokenizer's own special tokens added (a leading BOS)
    tok.eos_ids, tok.special_tokens["bos_token"], tok.chat_template

`PretrainedTokenizer.save(directory)` writes these files back, so a run directory that starts
from a checkpoint carries its tokenizer, special tokens and chat template.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import tokenizers

from jmoe.train.errors import MissingInputError, UserError
from jmoe.train.tokenizer import EOS_CANDIDATES, HF_FILE, HFTokenizer
from jmoe.train.tokenizer import HF_CONFIG_FILE as TOKENIZER_CONFIG

SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class PretrainedTokenizer(HFTokenizer):
    """A checkpoint's `tokenizers.Tokenizer` with its special tokens and chat template.

    Args:
      tokenizer: the loaded `tokenizer.json`.
      special_tokens: text of the special tokens by name (`bos_token`, `eos_token`, ...);
        `eos_token` is required and each one must be in the vocabulary.
      stop_ids: further ids that end a generation (the generation config's `eos_token_id`).
      chat_template: the Jinja chat template, or None.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        stop_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
    ):
        ids = {name: tokenizer.token_to_id(text) for name, text in special_tokens.items()}
        super().__init__(tokenizer, ids["eos_token"])
        self.special_tokens = dict(special_tokens)
        self.bos_id = ids.get("bos_token")
        self.pad_id = ids.get("pad_token")
        self._stop_ids = tuple(dict.fromkeys((self.eos_id, *stop_ids)))
        self.chat_template = chat_template

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: the end-of-text token, then the generation
        config's."""
        return self._stop_ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt with the tokenizer's special tokens (its post-processor: a leading
        BOS for Llama- and Mistral-style tokenizers, nothing for Qwen-style ones)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) and
        `generation_config.json` (the stop ids); `load_hf_tokenizer` reads them back."""
        path = super().save(directory)
        config: dict[str, Any] = dict(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(path.parent / TOKENIZER_CONFIG, config)
        _write_json(path.parent / GENERATION_CONFIG, {"eos_token_id": list(self.eos_ids)})
        return path


def load_hf_tokenizer(directory: str | pathlib.Path) -> PretrainedTokenizer:
    """Loads the tokenizer of a Hugging Face checkpoint directory.

    Special tokens come from `tokenizer_config.json`, then `special_tokens_map.json`; without an
    `eos_token` there, from the generation config's first `eos_token_id`, else from the usual
    end-of-text names (`jmoe.train.tokenizer.EOS_CANDIDATES`). The chat template is
    `chat_template.jinja` when present, else `tokenizer_config.json`'s `chat_template`.

    Raises:
      MissingInputError: the directory or its `tokenizer.json` does not exist.
      UserError: a file that does not parse, or a special token or id outside the vocabulary
        (the message names the file and field).
    """
    root = pathlib.Path(directory).expanduser()
    path = root / HF_FILE
    if not path.is_file():
        where = "does not exist" if not root.is_dir() else f"holds no {HF_FILE}"
        raise MissingInputError(f"tokenizer directory {str(root)!r} {where}")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception
        raise UserError(f"{path} is not a valid {HF_FILE}: {e}") from None
    config = _read_json(root / TOKENIZER_CONFIG)
    special_map = _read_json(root / SPECIAL_TOKENS_MAP)
    eos_ids = _generation_eos_ids(root / GENERATION_CONFIG)
    special = {}
    for name in SPECIAL_NAMES:
        for source, values in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special_map)):
            text = _token_text(values.get(name))
            if text is None:
                continue
            if tokenizer.token_to_id(text) is None:
                raise UserError(
                    f"{root / source}: {name}={text!r} is not in the vocabulary of {path}"
                )
            special[name] = text
            break
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for i in eos_ids:
        if not 0 <= i < vocab_size:
            raise UserError(
                f"{root / GENERATION_CONFIG}: eos_token_id {i} is outside the vocabulary "
                f"[0, {vocab_size}) of {path}"
            )
    if "eos_token" not in special:
        fallback = [tokenizer.id_to_token(i) for i in eos_ids[:1]]
        fallback += [t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None]
        if not fallback:
            raise UserError(
                f"{root} names no end-of-text token: set eos_token in {TOKENIZER_CONFIG} or "
                f"eos_token_id in {GENERATION_CONFIG}"
            )
        special["eos_token"] = fallback[0]
    return PretrainedTokenizer(tokenizer, special, tuple(eos_ids), load_chat_template(root))


def load_chat_template(directory: str | pathlib.Path) -> str | None:
    """The chat template of a tokenizer directory: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (a string, or named templates of which
    "default" is used); None when there is none."""
    root = pathlib.Path(directory)
    if (root / CHAT_TEMPLATE_FILE).is_file():
        template = (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        template = _read_json(root / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token_text(value) -> str | None:
    """A special token as written in a config: its text, or `{"content": text, ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _generation_eos_ids(path: pathlib.Path) -> list[int]:
    value = _read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{path}: eos_token_id={value!r} must be an integer or a list of them")
    return values


def _read_json(path: pathlib.Path) -> dict:
    """A JSON object file's content ({} when the file does not exist)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(content).__name__}")
    return content


def _write_json(path: pathlib.Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
