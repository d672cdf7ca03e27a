"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest

from phalanx_serve.detokenizer import IncrementalDetokenizer, StopStringMatcher


class ByteTokens:
    """Each token is one byte of UTF-8, the hardest case for incremental decoding."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_emitted_only_when_complete() -> None:
    detok = IncrementalDetokenizer(ByteTokens())
    text = "naïve → ok"
    deltas = [detok.push(b) for b in text.encode()]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("stop", "pieces", "sent", "stopped"),
    [
        pytest.param(("END",), ["abc", "EN", "D tail"], "abc", True, id="split-across-deltas"),
        pytest.param(("END",), ["abc", "EN", "x"], "abcENx", False, id="false-alarm-released"),
        pytest.param(("x", "yz"), ["ayz", "x"], "a", True, id="earliest-stop-wins"),
        pytest.param((), ["a", "b"], "ab", False, id="no-stop-strings"),
    ],
)
def test_stop_strings(stop: tuple[str, ...], pieces: list[str], sent: str, stopped: bool) -> None:
    matcher = StopStringMatcher(stop)
    out = "".join(matcher.add(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.finish()
    assert (out, matcher.stopped) == (sent, stopped)


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.add("hello ST") == "hello "
    assert matcher.add("ART") == "START"
