"""Calibration text: the tokens router statistics, pruning and merging are measured on.

A calibration set is a named slice of the embedded corpus (the running interpreter's standard
library): one package's `.py` files, a "task" whose routing can differ from another's (asyncio
event-loop code, email parsing, JSON coding ...). Every set names a package present in CPython
3.11 and 3.12; test-suite folders inside a package (`unittest/test` in 3.11) are left out, as
the training corpus leaves them out. User texts work the same way:

    tokens_BxS, mask_BxS = calibration_tokens("asyncio", tokenizer, seq_len=128, max_sequences=32)
    tokens_BxS, mask_BxS = calibration_tokens(["my prompt", "another"], tokenizer, seq_len=64,
                                              max_sequences=8)
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
from collections.abc import Sequence

import numpy as np

from jmoe.train import data
from jmoe.train.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """A named calibration set: the `.py` files under one standard-library package.

    Attributes:
      package: the package's folder, relative to the standard library's root.
      description: what its text is.
    """

    package: str
    description: str


CALIBRATION_SETS: dict[str, CalibrationSet] = {
    "asyncio": CalibrationSet("asyncio", "event loops, futures, transports, streams"),
    "email": CalibrationSet("email", "MIME parsing and generation, header encodings"),
    "json": CalibrationSet("json", "JSON encoder, decoder and scanner"),
    "unittest": CalibrationSet("unittest", "test cases, loaders, runners and mocks"),
    "http": CalibrationSet("http", "HTTP client, server and cookies"),
    "logging": CalibrationSet("logging", "loggers, handlers, formatters and config"),
    "xml": CalibrationSet("xml", "DOM, SAX and ElementTree XML processing"),
    "importlib": CalibrationSet("importlib", "the import system and package resources"),
    "concurrent": CalibrationSet("concurrent", "thread and process pool executors"),
}


def calibration_texts(name: str) -> list[str]:
    """The documents of calibration set `name`: its package's `.py` files, sorted by path.

    Raises:
      ValueError: an unknown set name (the message lists the known ones).
    """
    if name not in CALIBRATION_SETS:
        raise ValueError(
            f"unknown calibration set {name!r}: use one of {sorted(CALIBRATION_SETS)} or a list "
            "of texts"
        )
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / CALIBRATION_SETS[name].package).rglob("*.py"))
    kept = [f for f in files if not data.STDLIB_SKIP_DIRS & set(f.relative_to(root).parts[:-1])]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in kept]
    return [text for text in texts if text]


def calibration_tokens(
    name_or_texts: str | Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    max_sequences: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a calibration set (or user texts) and packs it into `[B, S]` sequences.

    The texts become one token stream (each followed by the tokenizer's end-of-text id), cut
    into consecutive windows of `seq_len` tokens; the last window is padded (mask False). With
    more windows than `max_sequences`, evenly spaced ones are kept, so the sequences sample the
    whole set rather than its first files.

    Args:
      name_or_texts: a `CALIBRATION_SETS` name, or a sequence of texts.
      tokenizer: any `jmoe.train.tokenizer` tokenizer (the model's).
      seq_len: tokens per sequence S >= 1.
      max_sequences: at most this many sequences B >= 1.

    Returns:
      `(tokens_BxS int32, mask_BxS bool)`, mask False on padding.

    Raises:
      ValueError: an unknown set name (listing the known ones), no text, or a bad size.
    """
    if seq_len < 1 or max_sequences < 1:
        raise ValueError(f"calibration_tokens: {seq_len=} and {max_sequences=} must be >= 1")
    if isinstance(name_or_texts, str):
        texts = calibration_texts(name_or_texts)
    else:
        texts = [text for text in name_or_texts if text]
    if not texts:
        raise ValueError("calibration_tokens: no text to calibrate on (give non-empty texts)")
    stream_N = data.token_stream(texts, tokenizer)
    # 1. ceil(N / S) windows; only the last one can be short, and it is padded with eos.
    num_windows = -(-len(stream_N) // seq_len)
    padded_N = np.full(num_windows * seq_len, tokenizer.eos_id, np.int32)
    padded_N[: len(stream_N)] = stream_N
    mask_N = np.arange(num_windows * seq_len) < len(stream_N)
    # 2. Evenly spaced windows (distinct, first and last included) when there are too many.
    rows = np.unique(np.linspace(0, num_windows - 1, min(num_windows, max_sequences)).round())
    rows = rows.astype(np.int64)
    tokens_BxS = padded_N.reshape(num_windows, seq_len)[rows]
    mask_BxS = mask_N.reshape(num_windows, seq_len)[rows]
    return tokens_BxS, mask_BxS
