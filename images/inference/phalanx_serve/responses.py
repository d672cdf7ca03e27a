"""Pure helpers that turn engine results into OpenAI response pieces (choices, logprobs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phalanx_serve.sampling import TokenLogprob


@dataclass
class SequenceResult:
    """Everything one sequence (one choice candidate) produced, gathered from its outputs."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(self.completion_tokens, 1)


def pick_best(copies: list[SequenceResult], n: int) -> list[SequenceResult]:
    """best_of: the n candidates with the highest log-probability per token (OpenAI's rule),
    in their original order when fewer than all are dropped ties keep generation order."""
    if len(copies) <= n:
        return copies
    ranked = sorted(range(len(copies)), key=lambda i: -copies[i].mean_logprob)[:n]
    return [copies[i] for i in sorted(ranked)]


Entry = tuple[int, TokenLogprob | None]


def prompt_entries(prompt_ids: list[int], scored: list[TokenLogprob | None] | None) -> list[Entry]:
    """Pair every prompt token with its score (the first token has none, as in OpenAI)."""
    scores = scored or []
    return [(t, scores[i] if i < len(scores) else None) for i, t in enumerate(prompt_ids)]


def generated_entries(logprobs: list[TokenLogprob]) -> list[Entry]:
    return [(lp.token, lp) for lp in logprobs]


class LogprobFormatter:
    def __init__(self, token_text: Callable[[int], str]) -> None:
        self.token_text = token_text

    def completion(self, entries: list[Entry], offset: int) -> dict[str, Any]:
        """The legacy completions ``logprobs`` object; offsets count characters of the
        returned text from ``offset``."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for entry in entries:
            token_id, lp = entry
            text = self.token_text(token_id)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            if lp is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(lp.logprob)
            # The chosen token is always listed, as vLLM does, so a client can tell whether
            # it was the most likely one.
            top = {self.token_text(t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    def chat(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [self._chat_entry(lp) for lp in logprobs]}

    def _chat_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        entry = self._top(lp.token, lp.logprob)
        entry["top_logprobs"] = [self._top(t, v) for t, v in lp.top]
        return entry

    def _top(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
