"""Key/value memory for running sequences: a paged cache of fixed-size blocks.

Each layer owns two tensors ``[num_blocks * block_size, n_kv_heads, head_dim]`` allocated once
at start-up, so memory use is known before the first request and never grows. A sequence owns
a *block table*, the list of blocks holding its tokens in order: token ``p`` lives in row
``table[p // block_size] * block_size + p % block_size``. Short sequences therefore take only
the blocks they fill, not a whole ``max_model_len`` reservation.

Automatic prefix caching (as vLLM's): a block whose ``block_size`` tokens are all computed is
registered under a key chained from its parent block's key and its own token ids (128-bit
BLAKE2b, so a key stands for the whole prefix up to the block's end and an accidental match is
out of reach in practice), so two prompts that start with the same tokens share those blocks
instead of recomputing them. Keys live only as long as their block holds that content, so the
index never outgrows the cache. Blocks nobody references stay cached until memory is needed;
the least recently freed is reused first.

The per-step ``*View`` objects implement the model's KV-cache protocol
(``k, v, mask = view.update(layer, k, v)``).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

BlockKey = bytes
NO_PARENT = b""


def block_key(parent: BlockKey, tokens: list[int]) -> BlockKey:
    """Key of a full block: a digest of its parent's key and its token ids."""
    data = struct.pack(f"<{len(tokens)}q", *tokens)
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class OutOfBlocksError(Exception):
    """No free or evictable block is left; the scheduler must preempt a sequence."""


class BlockManager:
    """Pure bookkeeping of blocks: allocation, reference counts and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        # Cached blocks with no reference, least recently freed first: reused before eviction.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_key: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        self.hits = 0  # prompt tokens served from the cache (for metrics and tests)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks findable by content (in use or evictable)."""
        return len(self._key_of)

    @property
    def usage(self) -> float:
        """Blocks referenced by live sequences over all blocks (vLLM's kv_cache_usage_perc)."""
        return self.num_used / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise OutOfBlocksError("every KV block is in use")
        self._refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup_prefix(self, tokens: list[int]) -> list[int]:
        """Referenced blocks caching the longest run of full blocks that starts ``tokens``.

        At least the last token is always left to compute: its logits choose the next token.
        """
        if not self.prefix_caching:
            return []
        table: list[int] = []
        parent = NO_PARENT
        bs = self.block_size
        for i in range((len(tokens) - 1) // bs):
            key = block_key(parent, tokens[i * bs : (i + 1) * bs])
            block = self._by_key.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            table.append(block)
            parent = key
        self.hits += len(table) * bs
        return table

    def register(self, table: list[int], tokens: list[int], computed: int) -> None:
        """Make the full blocks among the first ``computed`` tokens findable by their content."""
        if not self.prefix_caching:
            return
        parent = NO_PARENT
        bs = self.block_size
        for i in range(min(computed // bs, len(table))):
            block = table[i]
            key = self._key_of.get(block)
            if key is None:  # not registered yet (or a duplicate of another cached block)
                key = block_key(parent, tokens[i * bs : (i + 1) * bs])
                if key not in self._by_key:
                    self._by_key[key] = block
                    self._key_of[block] = key
            parent = key

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._by_key[key]


class PagedKVCache:
    def __init__(
        self,
        *,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        prefix_caching: bool = True,
    ) -> None:
        shape = (num_blocks * block_size, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.block_size = block_size
        self.device = device
        # The last decode step's gathered keys and values (see ``DecodeView``).
        self.decode_batch: DecodeBatch | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def usage(self) -> float:
        return self.blocks.usage

    def rows(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache rows of token positions ``[start, end)`` of a sequence with block ``table``."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` of one sequence computed in this step; keys span ``[0, end)``."""

    table: tuple[int, ...]
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class PackedPrefillView:
    """Prefill chunks of several sequences packed end to end in one row, without padding.

    Each chunk's queries attend to its own sequence's keys at positions ``[0, end)``: those
    already in the cache (a shared prefix, an earlier chunk) and the ones written in this step.
    A block-diagonal causal mask keeps sequences apart.
    """

    def __init__(
        self, cache: PagedKVCache, chunks: list[Chunk], logit_rows: list[int] | None = None
    ) -> None:
        self.cache = cache
        self.chunks = chunks
        # Packed positions whose logits the caller reads (None: all); models may skip the rest.
        self.logit_rows = logit_rows
        dev = cache.device
        write: list[int] = []
        read: list[int] = []
        for c in chunks:
            write += cache.rows(list(c.table), c.start, c.end)
            read += cache.rows(list(c.table), 0, c.end)
        self.write = torch.tensor(write, dtype=torch.int64, device=dev)
        self.read = torch.tensor(read, dtype=torch.int64, device=dev)
        q_seq = torch.cat([torch.full((c.length,), i) for i, c in enumerate(chunks)])
        q_pos = torch.cat([torch.arange(c.start, c.end) for c in chunks])
        k_seq = torch.cat([torch.full((c.end,), i) for i, c in enumerate(chunks)])
        k_pos = torch.cat([torch.arange(c.end) for c in chunks])
        mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        self.mask = mask[None, None].to(dev)
        self._positions = q_pos[None].to(dev)

    def spec(self) -> tuple[object, ...]:
        """Plain data from which another process rebuilds this view on its own cache."""
        return ("prefill", [(c.table, c.start, c.end) for c in self.chunks], self.logit_rows)

    def positions(self) -> torch.Tensor:
        return self._positions

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        # k is [1, kv_heads, T, head_dim]; the cache is row-major by token.
        keys[self.write] = k[0].transpose(0, 1)
        values[self.write] = v[0].transpose(0, 1)
        k_all = keys[self.read].transpose(0, 1)[None]
        v_all = values[self.read].transpose(0, 1)[None]
        return k_all, v_all, self.mask


# Positions of room a decode batch's gathered keys get beyond its longest sequence, so that
# it is gathered again from the blocks only once every so many steps.
DECODE_HEADROOM = 32


@dataclass
class DecodeBatch:
    """The keys and values of one decode step's sequences, gathered from their blocks into
    ``[B, capacity, kv_heads, head_dim]`` per layer and kept for the next step.

    While the same sequences decode step after step, each step appends one row per sequence
    here (as it does to the blocks) instead of gathering every live key and value again. The
    rows past a sequence's end are finite leftovers (row 0 of the cache, or older keys), which
    the step's mask hides.
    """

    ids: tuple[int, ...]
    lengths: list[int]  # tokens each sequence has here after the step that built or last grew it
    capacity: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class DecodeView:
    """One new token per sequence, each at its own position, batched as ``[B, 1]``.

    Keys are gathered from each sequence's blocks into ``[B, kv_heads, longest, head_dim]``;
    positions past a sequence's end point at row 0 and are masked out. With ``ids`` (one per
    sequence, never reused), a step whose sequences are the previous step's, each one token
    longer, reuses that step's gathered keys (``DecodeBatch``) and only appends the new ones.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        tables: list[list[int]],
        lengths: list[int],
        ids: tuple[int, ...] | None = None,
    ) -> None:
        """``lengths[i]``: tokens of sequence ``i`` already cached; the new one goes after."""
        self.cache = cache
        self.tables, self.lengths, self.ids = tables, lengths, ids
        dev = cache.device
        bs = cache.block_size
        self.batch = len(tables)
        self.span = max(lengths) + 1
        last = cache.decode_batch
        self.reuse = (
            ids is not None
            and last is not None
            and last.ids == ids
            and self.span <= last.capacity
            and all(a == b + 1 for a, b in zip(lengths, last.lengths, strict=True))
        )
        length_t = torch.tensor(lengths, dtype=torch.int64)
        self.pos = length_t.to(dev)
        if self.reuse:
            assert last is not None
            self.gathered = last
            self.write = torch.tensor(
                [t[n // bs] * bs + n % bs for t, n in zip(tables, lengths, strict=True)],
                dtype=torch.int64,
                device=dev,
            )
            valid = torch.arange(self.span)[None, :] <= length_t[:, None]
            # Where each sequence's new key goes in the gathered batch.
            self.append = torch.arange(self.batch, device=dev) * last.capacity + self.pos
            last.lengths = lengths
        else:
            # Gathered with room to grow: the next steps append instead of gathering again.
            capacity = self.span if ids is None else self.span + DECODE_HEADROOM
            width = -(-capacity // bs)
            padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
            # Rows of every (sequence, position) from the block tables, computed as tensors.
            table_t = torch.tensor(padded, dtype=torch.int64)
            pos = torch.arange(capacity)
            read = table_t[:, pos // bs] * bs + pos % bs
            live = pos[None, :] <= length_t[:, None]
            self.read = read.masked_fill(~live, 0).flatten().to(dev)
            self.write = read.gather(1, length_t[:, None])[:, 0].to(dev)
            valid = live[:, : self.span]
            self.gathered = DecodeBatch(ids or (), lengths, capacity, [], [])
            if ids is not None:
                cache.decode_batch = self.gathered
        # Equal lengths (a common case under load) need no mask: every gathered key is live.
        self.mask = None if min(lengths) == max(lengths) else valid[:, None, None, :].to(dev)

    def positions(self) -> torch.Tensor:
        return self.pos[:, None]

    def spec(self) -> tuple[object, ...]:
        return ("decode", self.tables, self.lengths, self.ids)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        k_new, v_new = k[:, :, 0], v[:, :, 0]
        keys.index_copy_(0, self.write, k_new)
        values.index_copy_(0, self.write, v_new)
        batch = self.gathered
        shape = (self.batch, batch.capacity, keys.shape[1], keys.shape[2])
        if self.reuse:
            k_all, v_all = batch.keys[layer], batch.values[layer]
            k_all.view(-1, *shape[2:]).index_copy_(0, self.append, k_new)
            v_all.view(-1, *shape[2:]).index_copy_(0, self.append, v_new)
        else:
            # [B * capacity, kv_heads, D] -> [B, capacity, kv_heads, D]
            k_all = keys.index_select(0, self.read).view(shape)
            v_all = values.index_select(0, self.read).view(shape)
            batch.keys.append(k_all)
            batch.values.append(v_all)
        # -> [B, kv_heads, span, D]
        span = self.span
        return k_all[:, :span].transpose(1, 2), v_all[:, :span].transpose(1, 2), self.mask


def view_from_spec(cache: PagedKVCache, spec: tuple[object, ...]) -> PackedPrefillView | DecodeView:
    kind = spec[0]
    if kind == "prefill":
        chunks = [Chunk(tuple(t), s, e) for t, s, e in spec[1]]  # type: ignore[attr-defined]
        return PackedPrefillView(cache, chunks, spec[2])  # type: ignore[arg-type]
    if kind == "decode":
        ids = spec[3] if len(spec) > 3 else None
        return DecodeView(cache, spec[1], spec[2], ids)  # type: ignore[arg-type]
    raise ValueError(f"unknown step kind {kind!r}")
