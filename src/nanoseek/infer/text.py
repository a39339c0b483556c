"""Token ids to streamed text: incremental decoding and stop strings.

A byte-level token can end inside a UTF-8 character, and the end of the text can be the start of a stop
string. Both are held back until the next tokens decide, so a client never sees a broken character (unless the
answer ends inside one: it then ends in U+FFFD) or a piece of a stop string, and the streamed pieces concatenate
to exactly the final text.
"""

from __future__ import annotations

from typing import Protocol

# Control characters a model may emit (escape sequences, carriage returns; C1's CSI is one byte in some terminals)
# would drive the terminal: dropped from what is printed there. Tabs and newlines stay.
_TERMINAL_UNSAFE = dict.fromkeys([*range(0, 9), *range(11, 32), *range(127, 160)])


def terminal_safe(text: str) -> str:
    """Model text for a terminal: without the control characters that would act on it."""
    return text.translate(_TERMINAL_UNSAFE)


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Decodes a window of recent tokens rather than the whole answer each time (O(1) per token, not O(length)):
    `prefix_text` is the text of ids[prefix:read], already in `text`; the window's text past it is new. The window
    starts at a token whose text was complete, so the pieces concatenate exactly (and tokenizers that treat the
    first token specially, like SentencePiece's leading space, see the same context as a whole decode)."""

    def __init__(self, tokenizer: Decoder, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the decode window is ids[prefix:]; ids[:read] are in `text`
        self.prefix_text = ""
        self.text = ""  # the complete characters decoded so far
        self.sent = 0  # characters of `text` already released

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token -> (text now safe to release, whether a stop string was reached)."""
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if len(window) > len(self.prefix_text) and not window.endswith("\ufffd"):  # no unfinished UTF-8 char
            self.text += window[len(self.prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        hit = self._first_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._release(len(self.text)), True
        safe = len(self.text) - self._held()
        return self._release(max(safe, self.sent)), False

    def flush(self) -> tuple[str, bool]:
        """At the end (length or stop token): whatever was held back, complete or not (an answer cut inside a
        character ends in U+FFFD) -> (that text, whether a stop string was reached: the last token can complete
        one while it starts a character, which `add` had held back)."""
        window = self.tokenizer.decode(self.ids[self.prefix:])
        self.text += window[len(self.prefix_text):]
        self.read, self.prefix_text = len(self.ids), window  # a second flush adds nothing
        hit = self._first_stop()
        if hit is not None:
            self.text = self.text[:max(hit, self.sent)]
        return self._release(len(self.text)), hit is not None

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def _first_stop(self) -> int | None:
        # a new stop string can only end in the new text, so search from just before it
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that must wait: the longest proper prefix of a stop string. Only the places in
        the tail where the stop string's first character occurs can start one (leftmost: the longest)."""
        text, held = self.text, 0
        for s in self.stop:
            i = text.find(s[0], max(0, len(text) - len(s) + 1))
            while i >= 0 and len(text) - i > held:
                if s.startswith(text[i:]):
                    held = len(text) - i
                    break
                i = text.find(s[0], i + 1)
        return held
