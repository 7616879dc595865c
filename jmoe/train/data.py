"""Data pipeline (grain): documents -> tokens -> packed windows -> shuffle -> batch -> shard.

Documents come from `load_documents`: the embedded corpus "stdlib" (the running interpreter's own
standard-library `.py` files: real text on every machine, no download), a text file, a directory,
a glob or a `.jsonl` file with a "text" field. `split_documents` holds out whole documents,
deterministically. `make_iterator` packs a document list into one token stream (each document
followed by the tokenizer's end-of-text id), cuts it into windows of `seq_len + 1` tokens that
overlap by one (every token but the first, up to the dropped tail, is a target once), shuffles
the windows with a fresh seeded permutation each epoch, and batches them with each token's
document id (`document_ids`: an end-of-text token opens the document after it). With P processes
the global batch of P * batch_size windows is split into P disjoint consecutive slices, slice i
for process i. The result is a grain `DatasetIterator` whose `get_state()` / `set_state()` resume it
exactly:

  docs = load_documents("stdlib", max_bytes=2_000_000)
  train_docs, eval_docs = split_documents(docs, eval_fraction=0.02, seed=0)
  it = make_iterator(train_docs, ByteTokenizer(), seq_len=128, batch_size=16, seed=0)
  batch = next(it)  # {"inputs", "targets", "segment_ids": [16, 128] int32, "mask": [16, 128] bool}

Every process tokenises the whole document list in memory (4 bytes per token): right for the
embedded corpus and user corpora up to a few hundred million tokens. Text that is not valid UTF-8
is read with each undecodable byte replaced by U+FFFD; `read_corpus` counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import re
import sysconfig
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jmoe.train.errors import MissingInputError, UserError
from jmoe.train.tokenizer import Tokenizer

STDLIB = "stdlib"
# Never part of the embedded corpus: installed packages, test suites, generated codec tables.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
)
_SOURCE_HELP = "'stdlib', a text file, a directory, a glob or a .jsonl file with a 'text' field"
_BINARY_PROBE_BYTES = 8192
# Lone surrogates: what `surrogateescape` decodes an invalid UTF-8 byte to, and what a JSON
# string may escape; no tokenizer can encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents of a data source and what reading them found.

    Attributes:
      documents: the non-empty documents, in a deterministic order.
      files: files read (including skipped binary ones).
      bytes: UTF-8 bytes of the documents.
      replaced: undecodable bytes (and lone surrogates of `.jsonl` strings) replaced by U+FFFD.
    """

    documents: list[str]
    files: int
    bytes: int
    replaced: int


def load_documents(source: str, max_bytes: int | None = None) -> list[str]:
    """The documents of a source, in a deterministic order (`read_corpus(...).documents`)."""
    return read_corpus(source, max_bytes).documents


def read_corpus(source: str, max_bytes: int | None = None) -> Corpus:
    """Reads the documents of a source, in a deterministic order.

    Args:
      source: "stdlib" (one document per standard-library `.py` file, sorted by path), a text
        file (one document), a directory (every non-hidden file below it, sorted by path), a glob
        (`**` allowed; matched directories are expanded) or a `.jsonl` file (one document per
        line's "text" field). Files with a NUL byte in their first 8 KiB are skipped as binary;
        each undecodable UTF-8 byte becomes U+FFFD (counted in `Corpus.replaced`).
      max_bytes: stop after this many UTF-8 bytes (the last document is cut); None reads all.

    Returns:
      The `Corpus`: its non-empty documents, file count, size and replaced bytes.
    """
    if max_bytes is not None and max_bytes < 1:
        raise UserError(f"{max_bytes=} must be None (all) or >= 1")
    files = _stdlib_files() if source == STDLIB else _source_files(source)
    docs, budget, replaced = [], max_bytes, 0
    for text, text_replaced in _texts(files):
        replaced += text_replaced
        if budget is not None:
            encoded = text.encode("utf-8")
            if len(encoded) >= budget:
                docs.append(encoded[:budget].decode("utf-8", errors="ignore"))
                break
            budget -= len(encoded)
        docs.append(text)
    docs = [doc for doc in docs if doc]
    if not docs:
        raise UserError(
            f"data source {source!r} ({len(files)} files) holds no text; use {_SOURCE_HELP}"
        )
    size = sum(len(doc.encode("utf-8")) for doc in docs)
    return Corpus(documents=docs, files=len(files), bytes=size, replaced=replaced)


def split_documents(
    docs: Sequence[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Holds out documents for evaluation, deterministically (no RNG, no dependence on order).

    Each document is ranked by a hash of (seed, its text); the `round(eval_fraction * n)`
    lowest-ranked (at least 1, at most n - 1) are held out. A single document is cut at the line
    boundary nearest to `(1 - eval_fraction)` of its length instead.

    Args:
      docs: the documents.
      eval_fraction: fraction held out, in (0, 1).
      seed: selects a different split.

    Returns:
      `(train_docs, eval_docs)`, each in the input order.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"{eval_fraction=} must be in (0, 1)")
    if not docs:
        raise ValueError("no documents to split")
    if len(docs) == 1:
        return _split_text(docs[0], eval_fraction)
    n_eval = min(max(round(eval_fraction * len(docs)), 1), len(docs) - 1)
    keys = [hashlib.sha256(f"{seed}\0{doc}".encode()).digest() for doc in docs]
    held_out = set(sorted(range(len(docs)), key=lambda i: (keys[i], i))[:n_eval])
    train_docs = [doc for i, doc in enumerate(docs) if i not in held_out]
    eval_docs = [doc for i, doc in enumerate(docs) if i in held_out]
    return train_docs, eval_docs


def token_stream(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Returns `[N]` int32: every document's tokens followed by `tokenizer.eos_id`.

    The last few results are memoised (read-only arrays), so the iterators and `unigram_loss`
    of one run tokenise each split once.
    """
    return _token_stream(tuple(docs), tokenizer)


@functools.lru_cache(maxsize=4)
def _token_stream(docs: tuple[str, ...], tokenizer: Tokenizer) -> np.ndarray:
    eos_1 = np.array([tokenizer.eos_id], np.int32)
    pieces = []
    for ids in tokenizer.encode_batch(docs):
        pieces += [np.asarray(ids, np.int32), eos_1]
    stream_N = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
    stream_N.setflags(write=False)
    return stream_N


def pack(stream_N: np.ndarray, seq_len: int) -> np.ndarray:
    """Returns `[W, seq_len + 1]` windows of the stream, window w starting at `w * seq_len`.

    A window's first `seq_len` tokens are inputs and its last `seq_len` targets; consecutive
    windows share one token. The tail shorter than a window is dropped. The result is a view.
    """
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be >= 1")
    if len(stream_N) < seq_len + 1:
        return np.zeros([0, seq_len + 1], stream_N.dtype)
    return np.lib.stride_tricks.sliding_window_view(stream_N, seq_len + 1)[::seq_len]


def make_iterator(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Builds this process's batch iterator over the packed documents.

    Args:
      docs: the documents (e.g. the train or eval split).
      tokenizer: any `Tokenizer`.
      seq_len: tokens per sequence S.
      batch_size: sequences per batch B on this process (the global batch is
        `batch_size * shard_count`).
      seed: shuffle seed (each epoch gets its own permutation).
      shuffle: False keeps the stream order (evaluation).
      num_epochs: None repeats forever (training); with a number the last global batch is
        filled with padding rows whose `mask` is False, so every window is seen exactly
        `num_epochs` times and every process gets the same number of batches.
      shard_index: this process, in [0, shard_count).
      shard_count: number of processes reading the same global batches.
      prefetch: batches prepared ahead by a background thread (0: prepared on `next`).

    Returns:
      A grain `DatasetIterator` of dicts `{"inputs": [B, S] int32, "targets": [B, S] int32
      (inputs shifted left by one), "mask": [B, S] bool, "segment_ids": [B, S] int32 (the
      `document_ids` of the inputs, for `Transformer(..., segment_ids_BxS=...)`)}`.
    """
    if batch_size < 1 or shard_count < 1 or prefetch < 0:
        raise ValueError(f"{batch_size=} and {shard_count=} must be >= 1, {prefetch=} >= 0")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"{shard_index=} must be in [0, {shard_count=})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"{num_epochs=} must be None (forever) or >= 1")
    windows_WxS1 = pack(token_stream(docs, tokenizer), seq_len)
    global_batch = batch_size * shard_count
    needed = global_batch if num_epochs is None else 1  # finite passes pad the last batch
    if len(windows_WxS1) < needed:
        raise UserError(
            f"the {len(docs)} documents pack into {len(windows_WxS1)} sequences of {seq_len + 1} "
            f"tokens, fewer than {needed} ({batch_size=} x "
            f"{shard_count=}); add text (data.source, data.max_bytes; data.eval_fraction for the "
            "held-out split) or lower seq_len or batch_size"
        )
    order = grain.MapDataset.range(len(windows_WxS1))
    if shuffle:
        order = order.shuffle(seed)
    order = order.repeat(num_epochs)
    if num_epochs is not None:
        padded = -(-len(order) // global_batch) * global_batch
        order = grain.MapDataset.range(padded).map(functools.partial(_index_or_pad, order))
    # drop_remainder keeps the length an exact integer (grain computes ceil(len / batch) in floats,
    # which overflows for an endless stream and batch_size 1); a finite pass is padded to whole
    # global batches above, so nothing is dropped.
    batches = order.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
    batches = batches.map(functools.partial(_gather, windows_WxS1, tokenizer.eos_id))
    read_options = grain.ReadOptions(num_threads=min(prefetch, 1), prefetch_buffer_size=prefetch)
    return iter(batches.to_iter_dataset(read_options))


def eval_iterator(docs: Sequence[str], tokenizer: Tokenizer, **options) -> grain.DatasetIterator:
    """The evaluation batches of `docs`: `make_iterator` in stream order, one epoch (the last
    batch padded); `options` are `make_iterator`'s `seq_len`, `batch_size` and sharding."""
    return make_iterator(docs, tokenizer, seed=0, shuffle=False, num_epochs=1, **options)


def unigram_loss(
    train_docs: Sequence[str], eval_docs: Sequence[str], tokenizer: Tokenizer
) -> float:
    """Held-out cross-entropy (nats per token) of the add-one unigram model of `train_docs`.

    `p(v) = (count_train(v) + 1) / (N_train + V)` over `V = tokenizer.vocab_size`, averaged
    over every token of `token_stream(eval_docs)`, end-of-text included: the baseline a
    language model must beat.
    """
    train_N = token_stream(train_docs, tokenizer)
    eval_N = token_stream(eval_docs, tokenizer)
    if len(eval_N) == 0:
        raise ValueError("eval_docs hold no tokens")
    counts_V = np.bincount(train_N, minlength=tokenizer.vocab_size).astype(np.float64)
    log_p_V = np.log(counts_V + 1) - np.log(len(train_N) + tokenizer.vocab_size)
    return float(-log_p_V[eval_N].mean())


def _index_or_pad(order: grain.MapDataset, j: int) -> int:
    return order[j] if j < len(order) else -1


def document_ids(inputs_BxS: np.ndarray, eos_id: int) -> np.ndarray:
    """Document (segment) id of each input token of packed windows, int32 `[B, S]`.

    The stream is `doc_0 eos doc_1 eos ...`; the end-of-text token that closes one document opens
    the next one, as its start-of-document token. So every target is predicted from its own
    document only: a document's last token predicts its end-of-text inside that document, and
    the end-of-text predicts the next document's first token with nothing before it. Ids count
    the end-of-text tokens up to and including each token (from 0 at the window start, whose
    piece of a document is a document of its own); only equality of ids matters.
    """
    return np.cumsum(inputs_BxS == eos_id, axis=1, dtype=np.int32)


def _gather(windows_WxS1: np.ndarray, eos_id: int, index_B: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `index_B` of the windows as a batch; index -1 is a padding row (all 0, mask False)."""
    real_B = index_B >= 0
    rows_BxS1 = np.where(real_B[:, None], windows_WxS1[np.where(real_B, index_B, 0)], 0)
    rows_BxS1 = rows_BxS1.astype(np.int32, copy=False)
    mask_BxS = np.broadcast_to(real_B[:, None], (len(index_B), rows_BxS1.shape[1] - 1)).copy()
    inputs_BxS = rows_BxS1[:, :-1]
    return {
        "inputs": inputs_BxS,
        "targets": rows_BxS1[:, 1:],
        "mask": mask_BxS,
        "segment_ids": document_ids(inputs_BxS, eos_id),
    }


def _stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in STDLIB_SKIP_DIRS]
        files += [pathlib.Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _source_files(source: str) -> list[pathlib.Path]:
    expanded = os.path.expanduser(source)
    if any(char in source for char in "*?["):
        matches = sorted(pathlib.Path(match) for match in glob.glob(expanded, recursive=True))
        if not matches:
            raise MissingInputError(f"data source glob {source!r} matched no files")
        return [file for match in matches for file in _files_under(match)]
    path = pathlib.Path(expanded)
    if not path.exists():
        raise MissingInputError(f"data source {source!r} does not exist; use {_SOURCE_HELP}")
    files = _files_under(path)
    if not files:
        raise UserError(f"data source directory {source!r} holds no files")
    return files


def _files_under(path: pathlib.Path) -> list[pathlib.Path]:
    """`[path]` for a file; for a directory its non-hidden files, recursively, sorted by path."""
    if not path.is_dir():
        return [path]
    files = (file for file in path.rglob("*") if file.is_file())
    visible = (f for f in files if not any(p.startswith(".") for p in f.relative_to(path).parts))
    return sorted(visible)


def _texts(files: Sequence[pathlib.Path]) -> Iterator[tuple[str, int]]:
    """`(document, replaced characters)` of each file in turn, lazily (reading stops when the
    caller stops)."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_texts(path)
            continue
        data = path.read_bytes()
        if b"\0" not in data[:_BINARY_PROBE_BYTES]:
            yield _replace_surrogates(data.decode("utf-8", errors="surrogateescape"))


def _replace_surrogates(text: str) -> tuple[str, int]:
    """`text` with every lone surrogate (an undecodable byte's stand-in) replaced by U+FFFD, and
    how many there were."""
    return _SURROGATE.subn("\ufffd", text)


def _jsonl_texts(path: pathlib.Path) -> Iterator[tuple[str, int]]:
    with path.open(encoding="utf-8", errors="surrogateescape") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number} is not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(
                    f"{path}:{line_number} has no string 'text' field (a .jsonl source needs "
                    'one JSON object per line like {"text": "..."})'
                )
            # Undecodable bytes and lone surrogates escaped in the JSON both end up here.
            yield _replace_surrogates(record["text"])


def _split_text(text: str, eval_fraction: float) -> tuple[list[str], list[str]]:
    """Cuts one document at the line boundary nearest to `(1 - eval_fraction)` of its length."""
    if len(text) < 2:
        raise UserError(
            f"a single document of {len(text)} characters cannot be split into training and "
            "held-out text: add text (data.source, data.max_bytes)"
        )
    target = min(max(round(len(text) * (1 - eval_fraction)), 1), len(text) - 1)
    line_starts = (text.rfind("\n", 0, target) + 1, text.find("\n", target) + 1)
    cuts = [start for start in line_starts if 0 < start < len(text)] or [target]
    cut = min(cuts, key=lambda start: abs(start - target))
    return [text[:cut]], [text[cut:]]
