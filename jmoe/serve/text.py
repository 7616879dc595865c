"""Incremental detokenization with stop strings.

Generated ids arrive one at a time; `TextStream` hands out only text that is final: it holds
back an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) and any tail
that could still grow into a stop string. A completion that hits a stop string ends just before
it (the stop string is not part of the text), as in the OpenAI API.

Decoding a token alone can lose what it means after the prompt: SentencePiece-style decoders
(Mistral, Llama 2) drop the word-start space of the first token they see. So the stream decodes
its ids after the last few prompt ids and keeps only the text past theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
PREFIX_IDS = 4  # prompt ids decoded before the generated ones


class TextStream:
    """The text of a growing list of token ids, released as it becomes final.

    Args:
      tokenizer: anything with `decode(ids) -> str`.
      stop: stop strings (non-empty).
      prompt_ids: the prompt; its last `PREFIX_IDS` ids are the context the generated ids
        are decoded in.

    Example:
      >>> stream = TextStream(tokenizer, stop=("\\n\\n",))
      >>> delta, stopped = stream.push(token_id)   # text safe to show, and whether it stopped
      >>> rest = stream.finish()                   # what was held back, at the end
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._prefix = [int(i) for i in prompt_ids[len(prompt_ids) - PREFIX_IDS :]]
        self._prefix_text = tokenizer.decode(self._prefix)
        if self._prefix_text.endswith(REPLACEMENT):  # ends inside a character: no context
            self._prefix, self._prefix_text = [], ""
        self._ids: list[int] = []
        self._text = ""  # decoded text of every id so far (cut at a stop string once hit)
        self._sent = 0  # characters of `_text` already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string once one was hit)."""
        return self._text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Adds one id; returns the newly final text and whether a stop string was hit."""
        if self.stopped:
            raise RuntimeError("TextStream.push after a stop string was hit")
        self._ids.append(token_id)
        self._text = self._decode()
        cut = self._stop_index()
        if cut is not None:
            self._text, self.stopped = self._text[:cut], True
            return self._release(len(self._text)), True
        return self._release(self._safe_end()), False

    def finish(self) -> str:
        """The text still held back (call once, when the completion ends)."""
        return self._release(len(self._text))

    def _decode(self) -> str:
        """The text of the generated ids, read after the prompt's last ids."""
        if self._prefix:
            text = self._tokenizer.decode(self._prefix + self._ids)
            if text.startswith(self._prefix_text):
                return text[len(self._prefix_text) :]
        return self._tokenizer.decode(self._ids)

    def _stop_index(self) -> int | None:
        """Where the first stop string starts (released text never holds one, nor ends with
        the start of one, so the search begins near the first unreleased character)."""
        found = None
        for stop in self._stop:
            i = self._text.find(stop, max(0, self._sent - len(stop) + 1))
            if i >= 0 and (found is None or i < found):
                found = i
        return found

    def _safe_end(self) -> int:
        """The end of the text that no later token can change or turn into a stop string."""
        end = len(self._text)
        while end > self._sent and self._text[end - 1] == REPLACEMENT:
            end -= 1  # an incomplete UTF-8 character so far
        held = 0  # the longest tail that is the start of a stop string
        for stop in self._stop:
            for n in range(min(len(stop) - 1, end - self._sent), held, -1):
                if self._text[end - n : end] == stop[:n]:
                    held = n
                    break
        return end - held

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        delta = self._text[self._sent : end]
        self._sent = end
        return delta
