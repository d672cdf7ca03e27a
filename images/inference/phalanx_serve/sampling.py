"""Sampling parameters and the batched next-token choice.

Every row of a batch carries its own parameters. Greedy rows (temperature 0) take the argmax
and are deterministic; sampled rows draw from their own ``torch.Generator`` so a request with a
``seed`` gets the same tokens no matter which other requests share its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # Below this, dividing by the temperature only risks overflow; the result is argmax.
        return self.temperature < GREEDY_TEMPERATURE

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        g.manual_seed(seed)
        return g


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``[B, V]`` float logits (rows are not greedy)."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
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
) -> list[int]:
    """Choose one token per row of ``[B, V]`` logits (any device, any float dtype)."""
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
