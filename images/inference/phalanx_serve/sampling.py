"""Sampling parameters and the batched next-token choice.

Every row of a batch carries its own parameters. The order of operations follows vLLM:
``min_tokens`` (end-of-sequence tokens banned while too short), ``logit_bias``, repetition
penalty (prompt and output tokens), frequency and presence penalties (output tokens), then
greedy argmax or temperature, ``min_p``, top-k and top-p, and a draw. Greedy rows (temperature 0)
are deterministic; sampled rows draw from their own ``torch.Generator``, so a request with a
``seed`` gets the same tokens no matter which other requests share its batch.

Log-probabilities reported to clients are those of the model's own distribution (the raw
logits' log-softmax, before penalties, bias or temperature), as vLLM reports by default.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Top alternatives reported per generated token; None: no logprobs at all.
    logprobs: int | None = None
    # Same for prompt tokens (echo with logprobs); None: prompt logprobs are not computed.
    prompt_logprobs: int | None = None
    # Keep the chosen token's logprob even without ``logprobs`` (best_of ranks by it).
    track_logprob: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, dividing by the temperature only risks overflow; the result is argmax.
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_processing(self) -> bool:
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    @property
    def needs_logprob(self) -> bool:
        return self.logprobs is not None or self.track_logprob

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        g.manual_seed(seed)
        return g


@dataclass(frozen=True)
class RowContext:
    """What the logits processors need to know about one sequence."""

    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: tuple[int, ...]  # end-of-sequence ids banned while min_tokens is not reached


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def process_logits(logits: torch.Tensor, params: SamplingParams, ctx: RowContext) -> torch.Tensor:
    """Apply min_tokens, logit_bias and the penalties to one ``[V]`` float row (a copy)."""
    out = logits.clone()
    vocab = out.shape[-1]
    if params.min_tokens and len(ctx.output_ids) < params.min_tokens:
        banned = [t for t in ctx.stop_ids if 0 <= t < vocab]
        if banned:
            out[banned] = float("-inf")
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device)
        out.index_add_(0, ids, bias)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(ctx.prompt_ids) | set(ctx.output_ids)), device=out.device)
        if seen.numel():
            vals = out[seen]
            p = params.repetition_penalty
            out[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.presence_penalty or params.frequency_penalty) and ctx.output_ids:
        counts = Counter(ctx.output_ids)
        ids = torch.tensor(list(counts), device=out.device)
        freq = torch.tensor(list(counts.values()), dtype=out.dtype, device=out.device)
        out[ids] -= params.frequency_penalty * freq + params.presence_penalty
    return out


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply temperature, min-p, top-k and top-p to ``[B, V]`` float logits (rows not greedy)."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    min_ps = [p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        probs = logits.softmax(dim=-1)
        floor = (
            probs.max(dim=-1, keepdim=True).values
            * torch.tensor(min_ps, dtype=probs.dtype)[:, None]
        )
        logits = logits.masked_fill(probs < floor, float("-inf"))
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if all(k == vocab for k in top_ks) and all(p >= 1.0 for p in top_ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    drop = rank >= torch.tensor(top_ks)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it
    # already does. The most likely token is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_ps, dtype=probs.dtype)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    contexts: list[RowContext] | None = None,
) -> list[int]:
    """Choose one token per row of ``[B, V]`` logits (any device, any float dtype)."""
    processed = [i for i, p in enumerate(params) if p.needs_processing]
    if processed:
        if contexts is None:
            raise ValueError("penalties and biases need each row's token context")
        logits = logits.clone()
        for i in processed:
            logits[i] = process_logits(logits[i], params[i], contexts[i])
    # Argmax on the device: only B integers cross to the host, not B x V logits.
    chosen: list[int] = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return chosen
    # Sampled rows go to the CPU, where each request's own generator lives.
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits[sampled].to("cpu", dtype)
    probs = filter_logits(rows, [params[i] for i in sampled]).softmax(dim=-1)
    for row, i in enumerate(sampled):
        p = probs[row]
        if not bool(torch.isfinite(p).all()) or float(p.sum()) <= 0.0:
            continue  # degenerate distribution (e.g. non-finite logits): keep the argmax
        chosen[i] = int(torch.multinomial(p, 1, generator=generators[i]).item())
    return chosen


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Log-probability of ``tokens[i]`` under row ``i`` of ``[N, V]`` logits, with the
    ``tops[i]`` most likely alternatives."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(logits.to(dtype), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    k = min(max(tops, default=0), lp.shape[-1])
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        v, ix = lp.topk(k, dim=-1)
        top_vals, top_ids = v.tolist(), ix.tolist()
    out = []
    for i, token in enumerate(tokens):
        top: tuple[tuple[int, float], ...] = ()
        if tops[i] > 0:
            top = tuple(zip(top_ids[i][: tops[i]], top_vals[i][: tops[i]], strict=True))
        out.append(TokenLogprob(token, chosen[i], top))
    return out
