"""Tokenizers: raw bytes, a byte-level BPE trained on the corpus, or a user `tokenizer.json`.

Every tokenizer follows the `Tokenizer` protocol: `encode` never adds special tokens (the data
pipeline inserts `eos_id` between documents itself) and `decode` drops them; `encode_prompt`
(what a server does with a text prompt) adds those of a Hugging Face checkpoint's tokenizer
(`jmoe.hf_tokenizer`), and `eos_ids` are the ids that end a generation. `save(directory)`
writes a file that `load_tokenizer(directory)` reads back, so a run directory carries its own
tokenizer:

  tok = make_tokenizer("bpe", train_texts, vocab_size=512, cache_dir="~/.cache/jmoe")
  tok.save(workdir)
  assert load_tokenizer(workdir).encode("def f(x):") == tok.encode("def f(x):")
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jmoe.train.errors import MissingInputError, UserError

EOS = "<|endoftext|>"
RESERVED = "<|reserved_{}|>"  # fills a BPE vocabulary that ran out of merges
HF_FILE = "tokenizer.json"
BYTE_FILE = "byte_tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"  # special tokens and chat template beside HF_FILE
# End-of-text names tried, in order, when loading a user tokenizer.json.
EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_BPE_CACHE_VERSION = "bpe-v2"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer and server need from a tokenizer."""

    vocab_size: int
    eos_id: int

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | pathlib.Path) -> pathlib.Path: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus end-of-text 256 (`vocab_size` 257)."""

    vocab_size = 257
    eos_id = 256
    eos_ids = (256,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(directory) / BYTE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "byte", "eos_id": self.eos_id}) + "\n")
        return path


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the `Tokenizer` protocol."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_id: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> HFTokenizer:
        """Loads a `tokenizer.json`; the end-of-text token is the first of `EOS_CANDIDATES`."""
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        for name in EOS_CANDIDATES:
            eos_id = tokenizer.token_to_id(name)
            if eos_id is not None:
                return cls(tokenizer, eos_id)
        raise UserError(
            f"{path} has none of the end-of-text tokens {EOS_CANDIDATES}; add one of them to "
            "its added_tokens"
        )

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(directory) / HF_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    cache_dir: str | pathlib.Path | None = None,
    *,
    max_bytes: int | None = 16_000_000,
) -> HFTokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` symbols (GPT-2 pre-tokenisation, `EOS`
    as its end-of-text token).

    Deterministic: the same texts and size give the same vocabulary and merges. With `cache_dir`
    the result is stored as `bpe-{vocab_size}-{hash}.json`, keyed by a hash of (texts,
    vocab_size), and reused on the next call.

    Args:
      texts: training documents (pass only what should be learned from, e.g. the train split).
      vocab_size: total symbols including the 256 byte symbols and `EOS`. When the texts hold
        too few distinct pairs to merge that far, the rest are reserved special tokens
        (`RESERVED`), which text only encodes to when it spells them out.
      cache_dir: optional directory of trained tokenizers.
      max_bytes: learn from the leading texts up to this many UTF-8 bytes (the text that
        crosses the limit included) so training stays within seconds; None uses all.

    Returns:
      The trained tokenizer.
    """
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < min_size:
        raise UserError(
            f"{vocab_size=} is below {min_size} (256 byte symbols + end-of-text): set "
            f"model.vocab_size={min_size} or more"
        )
    texts = _leading_texts(texts, max_bytes)
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"{_BPE_CACHE_VERSION}:{vocab_size}:{len(texts)}".encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        cache_path = (
            pathlib.Path(cache_dir).expanduser()
            / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
        )
        if cache_path.exists():
            return HFTokenizer.from_file(cache_path)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    missing = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens([RESERVED.format(i) for i in range(missing)])
    result = HFTokenizer(tokenizer, tokenizer.token_to_id(EOS))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        tokenizer.save(str(tmp_path))
        tmp_path.replace(cache_path)  # atomic: concurrent runs never read a partial file
    return result


def _leading_texts(texts: Iterable[str], max_bytes: int | None) -> list[str]:
    """The texts in order, stopping after the one that reaches `max_bytes` UTF-8 bytes."""
    taken, total = [], 0
    for text in texts:
        if max_bytes is not None and total >= max_bytes:
            break
        taken.append(text)
        total += len(text.encode("utf-8"))
    return taken


def load_tokenizer(path: str | pathlib.Path) -> ByteTokenizer | HFTokenizer:
    """Loads a `tokenizer.json` file, or a directory written by `Tokenizer.save`.

    Args:
      path: a Hugging Face `tokenizer.json`, or a directory holding `tokenizer.json` or
        `byte_tokenizer.json`. A directory whose `tokenizer.json` has a `tokenizer_config.json`
        beside it (a Hugging Face checkpoint's) loads with its special tokens and chat template
        (`jmoe.hf_tokenizer.load_hf_tokenizer`).

    Returns:
      The tokenizer.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        if (path / BYTE_FILE).exists():
            return ByteTokenizer()
        if not (path / HF_FILE).exists():
            raise MissingInputError(f"{path} holds neither {HF_FILE} nor {BYTE_FILE}")
        if (path / HF_CONFIG_FILE).exists():
            from jmoe.hf_tokenizer import load_hf_tokenizer  # it builds on this module

            return load_hf_tokenizer(path)
        path = path / HF_FILE
    if not path.is_file():
        raise MissingInputError(f"tokenizer {str(path)!r} does not exist")
    if path.name == BYTE_FILE:
        return ByteTokenizer()
    return HFTokenizer.from_file(path)


def make_tokenizer(
    kind: str,
    texts: Iterable[str] = (),
    vocab_size: int | None = None,
    cache_dir: str | pathlib.Path | None = None,
) -> ByteTokenizer | HFTokenizer:
    """Builds the tokenizer a run asks for.

    Args:
      kind: "byte", "bpe" (trained on `texts` with `vocab_size` symbols) or a tokenizer path.
      texts: training documents, used by "bpe" only.
      vocab_size: BPE vocabulary size, used by "bpe" only.
      cache_dir: BPE cache directory, used by "bpe" only.

    Returns:
      The tokenizer.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer 'bpe' needs a vocab_size")
        return train_bpe(texts, vocab_size, cache_dir)
    if not pathlib.Path(kind).expanduser().exists():
        raise MissingInputError(
            f"tokenizer={kind!r} is neither 'byte', 'bpe' nor an existing tokenizer.json or "
            "saved tokenizer directory"
        )
    return load_tokenizer(kind)
