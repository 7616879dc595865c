"""Incremental detokenization with stop strings.

Generated ids arrive one at a time; `TextStream` hands out only text that is final: it holds
back an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) and any tail
that could still grow into a stop string. A completion that hits a stop string ends just before
it (the stop string is not part of the text), as in the OpenAI API.

Decoding a token alone can lose what it means after the ids before it: SentencePiece-style
decoders (Mistral, Llama 2) drop the word-start space of the first token they see, and byte
fallback spreads one character over several ids. So the stream decodes only its newest ids,
after a few ids that came before them (the prompt's last ids at first), and keeps the text past
theirs: each token costs a decode of a few ids, not of the whole completion. New ids whose
text ends inside a character stay new until the character is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
CONTEXT_IDS = 4  # ids decoded before the new ones, for their context


class TextStream:
    """The text of a growing list of token ids, released as it becomes final.

    Args:
      tokenizer: anything with `decode(ids) -> str`.
      stop: stop strings (non-empty).
      prompt_ids: the prompt; its last `CONTEXT_IDS` ids (or a few more, to start on a
        character) are the context the first generated ids are decoded in.

    Example:
      >>> stream = TextStream(tokenizer, stop=("\\n\\n",))
      >>> delta, stopped = stream.push(token_id)   # text safe to show, and whether it stopped
      >>> rest = stream.finish()                   # what was held back, at the end
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._set_context([int(i) for i in prompt_ids[len(prompt_ids) - CONTEXT_IDS - 3 :]])
        self._new: list[int] = []  # ids whose text may still change (it ends inside a character)
        self._text = ""  # decoded text of every id so far (cut at a stop string once hit)
        self._settled = 0  # characters of `_text` from ids before `_new`
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
        self._new.append(token_id)
        new_text = self._decode_new()
        self._text = self._text[: self._settled] + new_text
        if not new_text.endswith(REPLACEMENT):  # whole characters: later ids cannot change it
            self._set_context(self._context + self._new)
            self._new, self._settled = [], len(self._text)
        cut = self._stop_index()
        if cut is not None:
            self._text, self.stopped = self._text[:cut], True
            return self._release(len(self._text)), True
        return self._release(self._safe_end()), False

    def finish(self) -> str:
        """The text still held back (call once, when the completion ends)."""
        return self._release(len(self._text))

    def _set_context(self, ids: list[int]) -> None:
        """Makes the last `CONTEXT_IDS` of `ids` the context of the next new ids, or up to 3
        more ids where those start inside a character (a byte-fallback decoder turns a run of
        bytes that starts there into U+FFFD, and drops the space that begins the text after)."""
        for n in range(CONTEXT_IDS, CONTEXT_IDS + 4):
            context = ids[-n:]
            text = self._tokenizer.decode(context)
            if not text.startswith(REPLACEMENT) or n >= len(ids):
                break
        if text.endswith(REPLACEMENT):  # ends inside a character: no context
            context, text = [], ""
        self._context, self._context_text = context, text

    def _decode_new(self) -> str:
        """The text of the new ids, read after the context ids."""
        if self._context:
            text = self._tokenizer.decode(self._context + self._new)
            if text.startswith(self._context_text):
                return text[len(self._context_text) :]
        return self._tokenizer.decode(self._new)

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
