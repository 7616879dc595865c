"""jmoe.serve.text: released text is final, stop strings cut the text, UTF-8 is never split."""

import numpy as np
import pytest
import tokenizers
from hf_fixtures import byte_level_bpe
from tokenizers import decoders, models

from jmoe.serve.text import TextStream
from jmoe.train.tokenizer import ByteTokenizer, HFTokenizer


def _run(text: str, stop=()):
    """Pushes `text` byte by byte; returns (the released pieces, stop hit, final text)."""
    stream = TextStream(ByteTokenizer(), stop)
    pieces, stopped = [], False
    for byte in text.encode():
        piece, stopped = stream.push(byte)
        pieces.append(piece)
        if stopped:
            break
    pieces.append(stream.finish())
    return pieces, stopped, stream.text


def test_without_stops_everything_is_released_in_order():
    pieces, stopped, text = _run("def f(x):\n    return x")
    assert "".join(pieces) == text == "def f(x):\n    return x" and not stopped
    assert all(len(p) <= 1 for p in pieces)  # one byte, one character: nothing held back


def test_a_stop_string_spanning_tokens_ends_the_text_before_it():
    pieces, stopped, text = _run("abc\n\ndef", stop=("\n\n",))
    assert stopped and text == "abc" and "".join(pieces) == "abc"


def test_a_possible_stop_prefix_is_held_then_released():
    stream = TextStream(ByteTokenizer(), ("END",))
    assert stream.push(ord("a")) == ("a", False)
    assert stream.push(ord("E")) == ("", False)  # may become "END"
    assert stream.push(ord("N")) == ("", False)
    assert stream.push(ord("x")) == ("ENx", False)  # it did not
    assert stream.push(ord("E")) == ("", False)
    assert stream.finish() == "E"  # the end releases what was held


def test_the_earliest_of_several_stops_wins():
    _, stopped, text = _run("xx STOP yy HALT", stop=("HALT", "STOP", " yy"))
    assert stopped and text == "xx "


def test_multibyte_characters_are_released_whole():
    pieces, _, text = _run("é€😀")
    assert text == "é€😀"
    assert [p for p in pieces if p] == ["é", "€", "😀"]  # never a replacement character


@pytest.mark.parametrize("stop", ["€", "b€"])
def test_stop_strings_with_multibyte_characters(stop):
    _, stopped, text = _run("ab€cd", stop=(stop,))
    assert stopped and text == "ab€cd"[: "ab€cd".index(stop)]


def _byte_fallback_tokenizer() -> HFTokenizer:
    """A SentencePiece-style tokenizer (Llama 2's decoder): `▁` word starts, whose first one
    loses its space, a few whole-word pieces, and byte-fallback ids `<0x00>`..`<0xFF>`."""
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁the", "é", "ab", "▁東京", "</s>"]
    model = models.BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    tokenizer.add_special_tokens(["</s>"])
    return HFTokenizer(tokenizer, eos_id=len(pieces) - 1)


def _random_ids(rng, tokenizer, n: int, valid: bool) -> list[int]:
    """At least `n` random ids, about a third of them the bytes of a whole multi-byte character
    (the byte ids of `ByteTokenizer` and of the byte-fallback tokenizer). `valid`: the others
    are ASCII bytes or whole pieces, so that the ids make valid UTF-8 (byte fallback turns all
    bytes of an invalid run into U+FFFD, so its text of invalid runs depends on the ids after)."""
    ids = []
    while len(ids) < n:
        if rng.random() < 1 / 3:
            ids += list("é€😀東京ü"[rng.integers(6)].encode())
        elif valid:
            ids.append(int(rng.choice([*range(32, 127), *range(256, tokenizer.vocab_size)])))
        else:
            ids.append(int(rng.integers(tokenizer.vocab_size)))
    return ids


@pytest.mark.parametrize("make", [ByteTokenizer, _byte_fallback_tokenizer, "byte_level_bpe"])
def test_text_equals_the_full_decode_on_random_ids(make):
    """Decoding only the new ids gives the full decode of every generated id after the prompt
    (once its characters are whole), and releases it in order, never a cut character."""
    tokenizer = HFTokenizer(byte_level_bpe(), eos_id=1) if make == "byte_level_bpe" else make()
    valid = make is _byte_fallback_tokenizer
    rng = np.random.default_rng(0)
    for _ in range(40):
        prompt = _random_ids(rng, tokenizer, int(rng.integers(0, 6)), valid)
        ids = _random_ids(rng, tokenizer, int(rng.integers(1, 40)), valid)
        context = prompt if tokenizer.decode(prompt)[-1:] != "\ufffd" else []

        def full(n):  # the reference: everything decoded at once, after the whole prompt
            return tokenizer.decode(context + ids[:n])[len(tokenizer.decode(context)) :]

        stream, pieces = TextStream(tokenizer, (), prompt), []
        for n, token in enumerate(ids, 1):
            pieces.append(stream.push(token)[0])
            if not full(n).endswith("\ufffd"):
                assert stream.text == full(n), (prompt, ids[:n])
            assert full(len(ids)).startswith("".join(pieces))  # released text is final
        pieces.append(stream.finish())
        assert "".join(pieces) == stream.text == full(len(ids))
