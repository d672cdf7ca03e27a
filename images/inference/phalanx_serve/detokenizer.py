"""Turning a growing list of token ids into text deltas, and cutting at stop strings.

Decoding token by token is wrong for byte-level vocabularies: one character may span several
tokens, and some decoders change a token's text depending on its left neighbour. So each step
decodes a short window that starts a few tokens back and emits only what grew beyond the
window's previously decoded text, holding back text that ends in an incomplete character.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: TokenDecoder) -> None:
        self.decoder = decoder
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens up to here have been turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decoder.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decoder.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        before = self.decoder.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decoder.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopStringMatcher:
    """Accumulates output text, finds stop strings, and says how much text is safe to emit.

    Text that could still become the start of a stop string is held back, so a client never
    receives part of a stop string that a later token completes.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.search_floor = 0

    def add(self, delta: str, *, check: bool = True) -> str:
        """Add decoded text; return the new text that can be sent now.

        With ``check`` false (``min_tokens`` not reached yet) the text is never searched for
        stop strings, and later searches start after it.
        """
        if self.stopped or not delta:
            return ""
        if not check:
            self.text += delta
            self.search_floor = len(self.text)
            return self._emit(len(self.text))
        search_from = max(self.search_floor, len(self.text) - self.longest + 1)
        self.text += delta
        if self.stop:
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Everything not yet sent (call once generation ended without a stop string)."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
