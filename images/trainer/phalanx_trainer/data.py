"""Token shards on disk, the tokenizer that made them, and the distributed sample loader.

Layout of a prepared data directory::

    index.json        {"format", "dtype", "vocab_size", "eos_id", "tokenizer", "splits"}
    tokenizer.json    byte-level BPE (``tokenizers`` library)
    train-00000.bin   raw little-endian token ids (uint16 if vocab < 65536, else uint32)
    val-00000.bin

Documents are concatenated with an end-of-text token between them. Training samples are
non-overlapping windows of ``seq_len + 1`` tokens that never cross a shard boundary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phalanx_trainer.termination import DataError, InvalidConfig

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "phalanx-tokens-v1"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 50_000_000


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (every byte is representable, so nothing is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


@dataclass(frozen=True)
class PreparedData:
    path: Path
    vocab_size: int
    eos_id: int
    dtype: np.dtype[Any]
    splits: dict[str, list[dict[str, Any]]]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def num_tokens(self, split: str = "train") -> int:
        return sum(int(s["tokens"]) for s in self.splits[split])

    @classmethod
    def open(cls, path: str | Path) -> PreparedData:
        root = Path(path)
        index_path = root / INDEX_FILE
        if not index_path.exists():
            raise InvalidConfig(
                f"{root} is not a prepared data directory (no {INDEX_FILE}); "
                "create one with `phalanx-data prepare`"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{index_path} cannot be read: {exc}") from exc
        if index.get("format") != FORMAT:
            raise DataError(f"{index_path}: unsupported format {index.get('format')!r}")
        try:
            return cls(
                path=root,
                vocab_size=int(index["vocab_size"]),
                eos_id=int(index["eos_id"]),
                dtype=np.dtype(index["dtype"]),
                splits=index["splits"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{index_path} is malformed: {exc!r}") from exc


def prepare(
    documents: Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    val_every: int = 100,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_path: str | Path | None = None,
) -> PreparedData:
    """Tokenize ``documents`` into shards under ``out_dir``, atomically (all or nothing).

    Every ``val_every``-th document goes to the ``val`` split. Without ``tokenizer_path`` a
    new BPE tokenizer with ``vocab_size`` entries is trained on the documents.
    """
    from tokenizers import Tokenizer

    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        tokenizer = train_tokenizer(documents, vocab_size)
    tokenizer.save(str(tmp / TOKENIZER_FILE))
    actual_vocab = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    dtype = token_dtype(actual_vocab)

    split_docs: dict[str, list[str]] = {"train": [], "val": []}
    for i, doc in enumerate(documents):
        is_val = val_every > 0 and i % val_every == val_every - 1
        split_docs["val" if is_val else "train"].append(doc)

    splits: dict[str, list[dict[str, Any]]] = {}
    for split, docs in split_docs.items():
        writer = _ShardWriter(tmp, split, dtype, shard_tokens)
        batch = 256
        for start in range(0, len(docs), batch):
            for enc in tokenizer.encode_batch(docs[start : start + batch]):
                writer.write([*enc.ids, eos_id])
        splits[split] = writer.close()

    index = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": actual_vocab,
        "eos_id": eos_id,
        "tokenizer": TOKENIZER_FILE,
        "splits": splits,
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return PreparedData.open(out)


class _ShardWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype[Any], shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.buffer: list[int] = []

    def write(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        while len(self.buffer) >= self.shard_tokens:
            self._flush(self.buffer[: self.shard_tokens])
            self.buffer = self.buffer[self.shard_tokens :]

    def _flush(self, ids: list[int]) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        np.asarray(ids, dtype=self.dtype).tofile(self.root / name)
        self.shards.append({"file": name, "tokens": len(ids)})

    def close(self) -> list[dict[str, Any]]:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = []
        return self.shards


class DistributedTokenLoader:
    """Deterministic, rank-sharded batches of ``[micro_batch, seq_len]`` inputs and targets.

    Samples form one global sequence: each epoch is a seeded permutation of all windows, and
    global sample ``g`` is window ``perm(g // W)[g % W]``. Every call to ``next_batch`` takes
    the next ``world_size * micro_batch`` global samples and rank ``r`` keeps its contiguous
    slice, so one optimizer step sees the same samples whatever the world size (given the
    same global batch). The position is a single integer, identical on all ranks.
    """

    def __init__(
        self,
        data: PreparedData,
        *,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._shards: list[np.memmap[Any, Any]] = []
        starts: list[int] = []  # first global window index of each shard
        total_windows = 0
        if split not in data.splits:
            raise DataError(f"{data.path} has no {split!r} split")
        for shard in data.splits[split]:
            try:
                tokens = np.memmap(data.path / shard["file"], dtype=data.dtype, mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"shard {shard['file']} of {data.path}: {exc}") from exc
            self._shards.append(tokens)
            starts.append(total_windows)
            total_windows += max(0, (len(tokens) - 1) // seq_len)
        if total_windows == 0:
            raise DataError(
                f"split {split!r} of {data.path} has fewer than {seq_len + 1} tokens per shard"
            )
        self.num_windows = total_windows
        self._shard_starts = np.asarray(starts)
        self.consumed_samples = 0
        self._perm_epoch = -1
        self._perm: np.ndarray[Any, Any] = np.empty(0, dtype=np.int64)

    def window(self, sample: int) -> np.ndarray[Any, Any]:
        epoch, pos = divmod(sample, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        window = int(self._perm[pos])
        shard = int(np.searchsorted(self._shard_starts, window, side="right") - 1)
        offset = (window - int(self._shard_starts[shard])) * self.seq_len
        return self._shards[shard][offset : offset + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.consumed_samples + self.rank * self.micro_batch
        rows = [self.window(first + b) for b in range(self.micro_batch)]
        self.consumed_samples += self.world_size * self.micro_batch
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise InvalidConfig(
                f"data position was saved with seq_len={state['seq_len']} seed={state['seed']}, "
                f"but this run uses seq_len={self.seq_len} seed={self.seed}"
            )
        self.consumed_samples = int(state["consumed_samples"])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "phalanx" / "data"


def ensure_builtin_data(vocab_size: int, cache_dir: str | Path | None = None) -> PreparedData:
    """The built-in corpus prepared with a ``vocab_size`` tokenizer, cached on disk."""
    import sys

    from phalanx_trainer.corpus import builtin_documents

    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = Path(cache_dir or default_cache_dir()) / f"builtin-{version}-v{vocab_size}"
    if (path / INDEX_FILE).exists():
        return PreparedData.open(path)
    log.info("preparing the built-in corpus into %s", path)
    return prepare(builtin_documents(), path, vocab_size=vocab_size)
