"""Data pipeline: sources and their errors, the split, packing vs a loop reference, shuffling,
per-process shards, iterator state, the unigram baseline."""

import codecs
import json
import math
import pathlib
import sysconfig

import numpy as np
import pytest

from jmoe.train import data
from jmoe.train.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
DOCS = [f"document {i}: " + "abcdefghij"[: i % 10] * (i % 4 + 1) + "\n" for i in range(40)]


def _reference_windows(docs, seq_len):
    """The packed windows built with plain loops: bytes + end-of-text per document."""
    stream = []
    for doc in docs:
        stream += list(doc.encode("utf-8")) + [BYTE.eos_id]
    n_windows = (len(stream) - 1) // seq_len
    return np.array([stream[w * seq_len : w * seq_len + seq_len + 1] for w in range(n_windows)])


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _rows(batches):
    """`[N, S + 1]` windows (inputs + last target) of the unmasked rows of a list of batches."""
    rows = []
    for batch in batches:
        real = batch["mask"][:, 0]
        rows.append(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)[real])
    return np.concatenate(rows)


# --- sources -----------------------------------------------------------------------------------


def test_stdlib_corpus_is_sorted_capped_and_deterministic():
    docs = data.load_documents("stdlib", max_bytes=60_000)
    assert sum(len(doc.encode()) for doc in docs) == 60_000
    assert docs == data.load_documents("stdlib", max_bytes=60_000)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    reference = sorted(
        (p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & {"test", "tests"}),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in reference[:4]]
    texts = [text for text in texts if text]
    assert docs[: len(texts)] == texts
    longer = data.load_documents("stdlib", max_bytes=100_000)
    assert longer[: len(docs) - 1] == docs[:-1]
    assert longer[len(docs) - 1].startswith(docs[-1])


def test_file_directory_glob_and_jsonl_sources(tmp_path):
    (tmp_path / "one.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.txt").write_text("second ✓\n")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "empty.txt").write_text("")
    records = [{"text": "json one"}, {"text": "json two\ud800", "id": 2}]  # a lone surrogate
    lines = [json.dumps(records[0]), "", json.dumps(records[1])]
    (tmp_path / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n")

    assert data.load_documents(str(tmp_path / "one.txt")) == ["first file\n"]
    everything = ["first file\n", "json one", "json two\ufffd", "second ✓\n"]
    assert data.load_documents(str(tmp_path)) == everything
    assert data.load_documents(str(tmp_path / "**" / "*.txt")) == ["first file\n", "second ✓\n"]
    assert data.load_documents(str(tmp_path / "s*")) == everything[1:]
    assert data.load_documents(str(tmp_path / "sub" / "c.jsonl")) == everything[1:3]
    assert data.load_documents(str(tmp_path), max_bytes=15) == ["first file\n", "json"]


def _undecodable_bytes(data: bytes) -> int:
    """Reference count of the bytes that are not part of valid UTF-8: Python's decoder reports
    each invalid stretch to an error handler, which counts its length."""
    counted = []

    def count(error):
        counted.append(error.end - error.start)
        return "", error.end

    codecs.register_error("count_undecodable_bytes", count)
    data.decode("utf-8", errors="count_undecodable_bytes")
    return sum(counted)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    pieces = [b"plain ascii\n", "ünïcödé ✓ 🙂\n".encode(), b"\xff\xfe latin-1 caf\xe9\n"]
    pieces += [b"cut \xe2\x9c", b" lone continuation \x80\x80 and \xc3(\n"]
    pieces += [bytes(rng.integers(1, 256, size=64, dtype=np.uint8))]
    for i, piece in enumerate(pieces):
        (tmp_path / f"{i}.txt").write_bytes(piece)
    corpus = data.read_corpus(str(tmp_path))
    expected = [piece.decode("utf-8", errors="replace") for piece in pieces]
    assert corpus.replaced == sum(_undecodable_bytes(piece) for piece in pieces) > 10
    assert corpus.files == len(pieces)
    assert corpus.bytes == sum(len(doc.encode()) for doc in corpus.documents)
    for got, want in zip(corpus.documents, expected, strict=True):
        # One U+FFFD per undecodable byte (Python's "replace" may merge a cut sequence into one).
        assert got.replace("\ufffd", "") == want.replace("\ufffd", "")
        assert got.count("\ufffd") >= want.count("\ufffd")
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.txt").write_text("all valid ✓\n")
    assert data.read_corpus(str(clean)).replaced == 0
    jsonl = tmp_path / "j" / "records.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_bytes(b'{"text": "bad \xff byte"}\n{"text": "escaped \\ud800 surrogate"}\n')
    corpus = data.read_corpus(str(jsonl))
    assert corpus.documents == ["bad \ufffd byte", "escaped \ufffd surrogate"]
    assert corpus.replaced == 2


def test_source_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nowhere.txt' does not exist; use 'stdlib'"):
        data.load_documents("nowhere.txt")
    with pytest.raises(FileNotFoundError, match=r"glob '.*\*.md' matched no files"):
        data.load_documents(str(tmp_path / "*.md"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt' \(1 files\) holds no text"):
        data.load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="directory .* holds no files"):
        data.load_documents(str(tmp_path / "empty_dir"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string 'text' field"):
        data.load_documents(str(bad))
    bad.write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3 is not valid JSON"):
        data.load_documents(str(bad))
    with pytest.raises(ValueError, match="max_bytes=0"):
        data.load_documents("stdlib", max_bytes=0)


# --- split -------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_order_free():
    train, held = data.split_documents(DOCS, eval_fraction=0.1, seed=0)
    assert len(held) == 4 and len(train) == 36
    assert sorted(train + held) == sorted(DOCS)
    assert not set(train) & set(held)
    assert [doc for doc in DOCS if doc in held] == held  # input order kept
    assert data.split_documents(DOCS, 0.1, 0) == (train, held)
    _, held_reversed = data.split_documents(DOCS[::-1], 0.1, 0)
    assert sorted(held_reversed) == sorted(held)  # membership depends on the text, not order
    assert data.split_documents(DOCS, 0.1, seed=1)[1] != held
    assert len(data.split_documents(DOCS[:3], 0.01, 0)[1]) == 1  # at least one held out
    assert len(data.split_documents(DOCS[:3], 0.99, 0)[0]) == 1  # at least one kept


def test_split_of_a_single_document_cuts_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    (train,), (held,) = data.split_documents([text], eval_fraction=0.1, seed=0)
    assert train + held == text
    assert train.endswith("\n") and abs(len(held) - 0.1 * len(text)) < 8
    assert data.split_documents(["ab"], 0.5, 0) == (["a"], ["b"])
    with pytest.raises(ValueError, match="cannot be split"):
        data.split_documents(["a"], 0.5, 0)
    with pytest.raises(ValueError, match=r"eval_fraction=1.0 must be in \(0, 1\)"):
        data.split_documents(DOCS, 1.0, 0)


# --- packing, shuffling, sharding, state ---------------------------------------------------------


def test_packing_matches_a_loop_reference():
    seq_len, batch_size = 16, 4
    reference = _reference_windows(DOCS, seq_len)
    batches = list(
        data.make_iterator(
            DOCS, BYTE, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1
        )
    )
    assert len(batches) == math.ceil(len(reference) / batch_size)
    for batch in batches:
        assert batch["inputs"].shape == batch["targets"].shape == (batch_size, seq_len)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["mask"].dtype == bool
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert batch["segment_ids"].dtype == np.int32
        for inputs_S, segments_S in zip(batch["inputs"], batch["segment_ids"]):
            document = 0  # an end-of-text input opens the next document
            for token, segment in zip(inputs_S, segments_S):
                document += int(token == BYTE.eos_id)
                assert segment == document
    np.testing.assert_array_equal(_rows(batches), reference)
    pad = len(batches) * batch_size - len(reference)
    assert 0 < pad < batch_size  # the example really exercises the padded tail
    last = batches[-1]
    assert not last["mask"][-pad:].any() and last["mask"][:-pad].all()
    assert not last["inputs"][-pad:].any()


def test_shuffle_is_a_seeded_permutation_per_epoch():
    seq_len, batch_size = 8, 5
    reference = _reference_windows(DOCS, seq_len)
    n = len(reference)

    def epochs(seed):
        it = data.make_iterator(
            DOCS, BYTE, seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=2
        )
        rows = _rows(list(it))
        return rows[:n], rows[n:]

    first, second = epochs(seed=0)
    for rows in (first, second):  # each epoch holds every window exactly once
        np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(reference, axis=0))
        assert len(rows) == n
    assert not np.array_equal(first, reference)  # shuffled
    assert not np.array_equal(first, second)  # a fresh permutation per epoch
    again_first, _ = epochs(seed=0)
    np.testing.assert_array_equal(again_first, first)
    other_first, _ = epochs(seed=1)
    assert not np.array_equal(other_first, first)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("num_epochs", [1, None])
def test_shards_are_disjoint_slices_of_the_global_batch(num_epochs, batch_size):
    seq_len, shard_count = 8, 3
    kwargs = dict(seq_len=seq_len, seed=7, num_epochs=num_epochs)
    n_steps = 6 if num_epochs is None else None
    global_it = data.make_iterator(DOCS, BYTE, batch_size=batch_size * shard_count, **kwargs)
    shard_its = [
        data.make_iterator(
            DOCS, BYTE, batch_size=batch_size, shard_index=i, shard_count=shard_count, **kwargs
        )
        for i in range(shard_count)
    ]
    if n_steps is None:
        global_batches = list(global_it)
        shards = [list(it) for it in shard_its]
    else:
        global_batches = _take(global_it, n_steps)
        shards = [_take(it, n_steps) for it in shard_its]
    assert all(len(shard) == len(global_batches) for shard in shards)
    for step, global_batch in enumerate(global_batches):
        for key in ("inputs", "targets", "mask", "segment_ids"):
            stacked = np.concatenate([shard[step][key] for shard in shards])
            np.testing.assert_array_equal(stacked, global_batch[key])
    if num_epochs == 1:  # together the shards cover every window once
        rows = np.concatenate([_rows(shard) for shard in shards])
        reference = _reference_windows(DOCS, seq_len)
        np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(reference, axis=0))
        assert len(rows) == len(reference)


@pytest.mark.parametrize("prefetch,batch_size", [(0, 4), (2, 4), (2, 1)])
def test_iterator_state_restores_exactly(prefetch, batch_size):
    kwargs = dict(seq_len=8, batch_size=batch_size, seed=3, prefetch=prefetch)
    it = data.make_iterator(DOCS, BYTE, **kwargs)
    _take(it, 11)  # past the end of the first epoch
    state = it.get_state()
    expected = _take(it, 9)
    resumed = data.make_iterator(DOCS, BYTE, **kwargs)
    resumed.set_state(state)
    for got, want in zip(_take(resumed, 9), expected, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_iterator_errors():
    with pytest.raises(ValueError, match=r"1 documents pack into 2 sequences .* fewer than 6"):
        data.make_iterator(["x" * 40], BYTE, seq_len=16, batch_size=3, shard_count=2, seed=0)
    # one finite pass pads its last global batch instead: only an empty stream is refused
    once = dict(seq_len=16, batch_size=3, shard_count=2, seed=0, num_epochs=1)
    assert len(list(data.make_iterator(["x" * 40], BYTE, **once))) == 1
    with pytest.raises(ValueError, match=r"pack into 0 sequences .* fewer than 1"):
        data.make_iterator(["x" * 8], BYTE, **once)
    with pytest.raises(ValueError, match=r"shard_index=2 must be in \[0, shard_count=2\)"):
        data.make_iterator(
            DOCS, BYTE, seq_len=8, batch_size=1, seed=0, shard_index=2, shard_count=2
        )
    with pytest.raises(ValueError, match="num_epochs=0"):
        data.make_iterator(DOCS, BYTE, seq_len=8, batch_size=1, seed=0, num_epochs=0)
    with pytest.raises(ValueError, match="seq_len=0"):
        data.make_iterator(DOCS, BYTE, seq_len=0, batch_size=1, seed=0)


# --- unigram baseline ----------------------------------------------------------------------------


def test_unigram_loss_by_hand():
    # train stream: a b EOS b EOS -> counts a:1, b:2, EOS:2 of N = 5; V = 257 with add-one.
    train, held = ["ab", "b"], ["bc"]
    p_b, p_c, p_eos = 3 / 262, 1 / 262, 3 / 262
    expected = -(math.log(p_b) + math.log(p_c) + math.log(p_eos)) / 3
    assert data.unigram_loss(train, held, BYTE) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="no tokens"):
        data.unigram_loss(train, [], BYTE)
