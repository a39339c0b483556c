"""Token ids to streamed text: incremental decoding and stop strings.

A byte-level token can end inside a UTF-8 character, and the end of the text can be the start of a stop
string. Both are held back until the next tokens decide, so a client never sees a broken character or a
piece of a stop string, and the streamed pieces concatenate to exactly the final text.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already released

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token -> (text now safe to release, whether a stop string was reached)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hit = self._first_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._release(len(self.text)), True
        safe = len(self.text) - self._held()
        return self._release(max(safe, self.sent)), False

    def flush(self) -> str:
        """At the end (length or stop token): whatever was held back, complete or not."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def _first_stop(self) -> int | None:
        # a new stop string can only end in the new text, so search from just before it
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that must wait: an unfinished UTF-8 character (decoded as U+FFFD) or the
        longest proper prefix of a stop string."""
        held = len(self.text) - len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held
