"""Pure helpers that turn engine results into OpenAI response bodies and stream chunks.

Every body the API answers with is built here from the ``protocol`` models, so the wire shape of
a completion, a chat completion and their stream chunks is written in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from phalanx_serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    TopLogprob,
    Usage,
)
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

    def completion(self, entries: list[Entry], offset: int) -> CompletionLogprobs:
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
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=token_logprobs,
            top_logprobs=top_logprobs,
            text_offset=text_offset,
        )

    def chat(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[self._chat_entry(lp) for lp in logprobs])

    def _chat_entry(self, lp: TokenLogprob) -> ChatTokenLogprob:
        text = self.token_text(lp.token)
        return ChatTokenLogprob(
            token=text,
            logprob=lp.logprob,
            bytes=list(text.encode("utf-8")),
            top_logprobs=[self._top(t, v) for t, v in lp.top],
        )

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text = self.token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def result_usage(prompt_tokens: int, results: list[SequenceResult]) -> Usage:
    return usage(prompt_tokens, sum(r.completion_tokens for r in results))


@dataclass(frozen=True)
class ResponseHeader:
    """What every body and chunk of one request repeats: its id, creation time and model."""

    request_id: str
    created: int
    model: str


def completion_choice(
    index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None
) -> CompletionChoice:
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)


def completion_response(
    head: ResponseHeader, choices: list[CompletionChoice], used: Usage
) -> CompletionResponse:
    return CompletionResponse(
        id=head.request_id, created=head.created, model=head.model, choices=choices, usage=used
    )


def chat_choice(index: int, result: SequenceResult, logprobs: ChatLogprobs | None) -> ChatChoice:
    return ChatChoice(
        index=index,
        message=ChatResponseMessage(content=result.text),
        logprobs=logprobs,
        finish_reason=result.finish_reason,
    )


def chat_completion_response(
    head: ResponseHeader, choices: list[ChatChoice], used: Usage
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=head.request_id, created=head.created, model=head.model, choices=choices, usage=used
    )


@dataclass(frozen=True)
class StreamChunks:
    """Builds the server-sent chunks of one streamed request as plain JSON-ready dicts.

    With ``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last one
    with no choices carries the totals; without it no chunk has a ``usage`` key at all.

    A text-only completion chunk (no logprobs), one per sequence and engine step, is by far the
    most frequent; it is filled into a dict laid out once per stream by the same ``protocol``
    models, instead of validating and dumping two models per token, and ``completion_event``
    writes it straight into its server-sent event from a byte template of that layout."""

    head: ResponseHeader
    include_usage: bool
    _text_chunk: dict[str, Any] = field(init=False, repr=False, compare=False)
    _text_event: tuple[bytes, bytes, bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        laid_out = self._completion([completion_choice(0, "", None, None)])
        object.__setattr__(self, "_text_chunk", laid_out)
        # The event of the laid-out chunk, cut where the index, text and finish reason go.
        marks = ("\x00index", "\x00text", "\x00finish")
        marked = {**laid_out["choices"][0]}
        marked["index"], marked["text"], marked["finish_reason"] = marks
        wire = sse_event({**laid_out, "choices": [marked]})
        parts: list[bytes] = []
        for mark in marks:
            before, wire = wire.split(json.dumps(mark).encode(), 1)
            parts.append(before)
        object.__setattr__(self, "_text_event", (*parts, wire))

    def completion_event(self, index: int, text: str, finish_reason: str | None) -> bytes:
        """``sse_event(self.completion(index, text, None, finish_reason))``, without the dict."""
        head, after_index, after_text, tail = self._text_event
        reason = (
            b"null" if finish_reason is None else encode_basestring_ascii(finish_reason).encode()
        )
        return b"".join(
            (head, str(index).encode(), after_index, encode_basestring_ascii(text).encode(),
             after_text, reason, tail)
        )  # fmt: skip

    def completion(
        self,
        index: int,
        text: str,
        logprobs: CompletionLogprobs | None,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        if logprobs is None:
            choice = {**self._text_chunk["choices"][0]}
            choice["index"], choice["text"], choice["finish_reason"] = index, text, finish_reason
            return {**self._text_chunk, "choices": [choice]}
        return self._completion([completion_choice(index, text, logprobs, finish_reason)])

    def completion_usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._completion([], usage(prompt_tokens, completion_tokens))

    def chat(
        self,
        index: int,
        delta: ChatDelta,
        logprobs: ChatLogprobs | None,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
        )
        return self._chat([choice])

    def chat_usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._chat([], usage(prompt_tokens, completion_tokens))

    def _completion(
        self, choices: list[CompletionChoice], used: Usage | None = None
    ) -> dict[str, Any]:
        head = self.head
        chunk = CompletionChunk(
            id=head.request_id, created=head.created, model=head.model, choices=choices, usage=used
        )
        return self._dump(chunk)

    def _chat(self, choices: list[ChatChunkChoice], used: Usage | None = None) -> dict[str, Any]:
        head = self.head
        chunk = ChatCompletionChunk(
            id=head.request_id, created=head.created, model=head.model, choices=choices, usage=used
        )
        return self._dump(chunk)

    def _dump(self, chunk: CompletionChunk | ChatCompletionChunk) -> dict[str, Any]:
        return chunk.model_dump(exclude=None if self.include_usage else {"usage"})


def sse_event(chunk: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``chunk`` as compact JSON."""
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()


def stream_error(message: str) -> dict[str, Any]:
    """The event that ends a stream whose generation failed (the status line is long sent)."""
    return ErrorResponse(error=ErrorBody(message=message, type="service_unavailable")).model_dump(
        exclude_none=True
    )
