"""Key/value memory for running sequences: a fixed budget of pre-allocated slots.

Each layer owns two tensors ``[max_slots, n_kv_heads, max_len, head_dim]`` allocated once at
start-up, so the server's memory use is known before the first request and never grows.
Sequence ``i`` of the running batch always lives in slot ``i``: when a sequence leaves, the last
one is moved into its hole. Keeping the batch packed at the front means a decode step attends
over ``cache[:batch, :, :longest]``, a view, rather than gathering scattered slots every step.

The per-step ``*View`` objects implement the model's KV-cache protocol
(``k, v, mask = view.update(layer, k, v)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SlotKVCache:
    def __init__(
        self,
        *,
        n_layers: int,
        max_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_slots, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        # Tokens whose keys/values are stored, per slot; 0 means free.
        self.lengths = [0] * max_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def used_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def usage(self) -> float:
        """Fraction of token positions holding live keys/values (vLLM's kv_cache_usage_perc)."""
        return self.used_tokens / (self.max_slots * self.max_len)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into ``dst`` (only the filled prefix) and free ``src``."""
        n = self.lengths[src]
        if src != dst and n:
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0


@dataclass(frozen=True)
class Segment:
    """One prompt inside a packed prefill row: tokens ``[start, start+length)`` go to ``slot``."""

    slot: int
    start: int
    length: int


class PackedPrefillView:
    """Prefill several prompts packed end to end in one row, without padding.

    Positions restart at 0 for every prompt and a block-diagonal causal mask keeps the prompts
    from seeing each other. The keys/values of each segment are copied into its slot.
    """

    def __init__(self, cache: SlotKVCache, segments: list[Segment]) -> None:
        self.cache = cache
        self.segments = segments
        total = sum(s.length for s in segments)
        seq_id = torch.empty(total, dtype=torch.int64)
        for i, s in enumerate(segments):
            seq_id[s.start : s.start + s.length] = i
        idx = torch.arange(total)
        same = seq_id[:, None] == seq_id[None, :]
        causal = idx[None, :] <= idx[:, None]
        self.mask = (same & causal)[None, None].to(cache.device)

    def positions(self) -> torch.Tensor:
        pos = torch.cat([torch.arange(s.length) for s in self.segments])
        return pos[None].to(self.cache.device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        for s in self.segments:
            keys[s.slot, :, : s.length] = k[0, :, s.start : s.start + s.length]
            values[s.slot, :, : s.length] = v[0, :, s.start : s.start + s.length]
        return k, v, self.mask

    def commit(self) -> None:
        for s in self.segments:
            self.cache.lengths[s.slot] = s.length


class DecodeView:
    """One new token for each of the first ``batch`` slots, each at its own position."""

    def __init__(self, cache: SlotKVCache, batch: int) -> None:
        self.cache = cache
        self.batch = batch
        lengths = cache.lengths[:batch]
        self.pos = torch.tensor(lengths, dtype=torch.int64, device=cache.device)
        self.rows = torch.arange(batch, device=cache.device)
        # Attend only as far as the longest sequence: the rest of the slot memory is not read.
        self.span = max(lengths) + 1
        keys_idx = torch.arange(self.span, device=cache.device)
        self.mask = (keys_idx[None, :] <= self.pos[:, None])[:, None, None, :]

    def positions(self) -> torch.Tensor:
        return self.pos[:, None]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.pos] = k[:, :, 0]
        values[self.rows, :, self.pos] = v[:, :, 0]
        n, s = self.batch, self.span
        return keys[:n, :, :s], values[:n, :, :s], self.mask

    def commit(self) -> None:
        for i in range(self.batch):
            self.cache.lengths[i] += 1
