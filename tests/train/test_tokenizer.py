"""Tokenizers: byte round trips, BPE training (size, determinism, cache), save/load, user files."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jmoe.train import tokenizer as tok_lib
from jmoe.train.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, make_tokenizer, train_bpe

SAMPLES = [
    "def f(x):\n    return x + 1  # comment\n",
    "héllo wörld ✓ 日本語 🙂\t\r\n",
    "",
    "   leading and trailing spaces   ",
    "\x00\x01 control bytes \x7f",
]
# Small but varied training text: every symbol is seen and there are enough distinct pairs for
# the vocabulary to fill up completely.
CORPUS = [
    f"def function_{i}(value, other={i}):\n    return value * {i} + other  # ünïcode {i % 7}\n"
    for i in range(300)
] + ["class Thing:\n    pass\n", "import os\nprint(os.path.join('a', 'b'))\n"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=320)


def test_byte_tokenizer_round_trip_and_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.eos_id, *ids, tok.eos_id]) == text  # end-of-text is dropped
    assert tok.encode_batch(SAMPLES) == [tok.encode(text) for text in SAMPLES]


def test_bpe_round_trip_size_and_compression(bpe):
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 320
    assert bpe.tokenizer.id_to_token(bpe.eos_id) == tok_lib.EOS
    for text in SAMPLES + CORPUS[:3]:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size and i != bpe.eos_id for i in ids)
        assert bpe.decode(ids) == text
        assert bpe.decode([bpe.eos_id, *ids]) == text
    # The merges learned from the corpus compress it well below one token per byte.
    text = CORPUS[5]
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(text) for text in SAMPLES]


def test_bpe_is_deterministic(bpe, tmp_path):
    again = train_bpe(list(CORPUS), vocab_size=320)
    assert again.tokenizer.to_str() == bpe.tokenizer.to_str()
    # Another process (other hash seeds) learns the same vocabulary and merges.
    script = (
        "import sys; from jmoe.train.tokenizer import train_bpe; "
        "from test_tokenizer import CORPUS; train_bpe(CORPUS, vocab_size=320).save(sys.argv[1])"
    )
    here = pathlib.Path(__file__)
    path = os.pathsep.join(
        [str(here.parent), str(here.parents[2]), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": path}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env)
    assert load_tokenizer(tmp_path).tokenizer.to_str() == bpe.tokenizer.to_str()
    other_size = train_bpe(CORPUS, vocab_size=300)
    assert other_size.vocab_size == 300
    assert other_size.tokenizer.to_str() != bpe.tokenizer.to_str()


def test_bpe_has_exactly_vocab_size_symbols_when_merges_run_out():
    text = "hello world, hello there"  # a few dozen distinct pairs, far fewer than 512 merges
    bpe = train_bpe([text], vocab_size=512)
    assert bpe.vocab_size == bpe.tokenizer.get_vocab_size(with_added_tokens=True) == 512
    vocab = bpe.tokenizer.get_vocab(with_added_tokens=True)
    reserved = sorted(i for name, i in vocab.items() if name.startswith("<|reserved_"))
    learned = 512 - len(reserved)
    assert reserved == list(range(learned, 512)) and 257 < learned < 300
    for sample in [text, *SAMPLES]:
        ids = bpe.encode(sample)
        assert max(ids, default=0) < learned  # text never encodes to a reserved symbol
        assert bpe.decode(ids) == sample
    assert train_bpe(CORPUS, vocab_size=320).tokenizer.token_to_id("<|reserved_0|>") is None


def test_bpe_learns_from_the_leading_max_bytes():
    limit = len(CORPUS[0].encode()) + 1  # reached inside the second text
    capped = train_bpe(CORPUS, vocab_size=300, max_bytes=limit)
    assert capped.tokenizer.to_str() == train_bpe(CORPUS[:2], vocab_size=300).tokenizer.to_str()
    assert capped.tokenizer.to_str() != train_bpe(CORPUS[:3], vocab_size=300).tokenizer.to_str()


def test_bpe_cache_is_keyed_by_texts_and_size(tmp_path, monkeypatch, bpe):
    first = train_bpe(CORPUS, vocab_size=320, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("bpe-320-*.json")
    assert first.tokenizer.to_str() == bpe.tokenizer.to_str()

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the cache holds this tokenizer")

    monkeypatch.setattr(tok_lib.trainers, "BpeTrainer", no_training)
    second = train_bpe(CORPUS, vocab_size=320, cache_dir=tmp_path)
    assert second.encode(CORPUS[0]) == bpe.encode(CORPUS[0])
    with pytest.raises(AssertionError, match="trained although"):
        train_bpe(CORPUS[:-1], vocab_size=320, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="trained although"):
        train_bpe(CORPUS, vocab_size=321, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]


def test_save_and_load_round_trip(tmp_path, bpe):
    path = bpe.save(tmp_path / "bpe_run")
    assert path.name == "tokenizer.json"
    for where in (tmp_path / "bpe_run", path):
        loaded = load_tokenizer(where)
        assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
        assert [loaded.encode(text) for text in SAMPLES] == [bpe.encode(text) for text in SAMPLES]
    ByteTokenizer().save(tmp_path / "byte_run")
    assert isinstance(load_tokenizer(tmp_path / "byte_run"), ByteTokenizer)
    assert isinstance(make_tokenizer(str(tmp_path / "byte_run")), ByteTokenizer)


def _word_level_json(path, vocab):
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([name for name in vocab if name.startswith("<")])
    hf.save(str(path))
    return path


def test_user_tokenizer_json(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    path = _word_level_json(tmp_path / "tokenizer.json", vocab)
    for kind in (str(path), str(tmp_path)):
        tok = make_tokenizer(kind)
        assert (tok.vocab_size, tok.eos_id) == (5, 2)
        assert tok.encode("hello world hello") == [3, 4, 3]
        assert tok.encode("hello mars") == [3, 0]


def test_user_tokenizer_without_end_of_text_is_refused(tmp_path):
    path = _word_level_json(tmp_path / "tokenizer.json", {"<unk>": 0, "a": 1})
    with pytest.raises(ValueError, match="end-of-text"):
        load_tokenizer(path)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200 is below 257"):
        train_bpe(CORPUS, vocab_size=200)
    with pytest.raises(ValueError, match="needs a vocab_size"):
        make_tokenizer("bpe", CORPUS)
    with pytest.raises(FileNotFoundError, match="neither 'byte', 'bpe' nor"):
        make_tokenizer("bytes")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(Exception):  # noqa: B017 (the tokenizers library's own parse error)
        load_tokenizer(tmp_path / "bad.json")
