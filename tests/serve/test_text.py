"""jmoe.serve.text: released text is final, stop strings cut the text, UTF-8 is never split."""

import pytest

from jmoe.serve.text import TextStream
from jmoe.train.tokenizer import ByteTokenizer


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
