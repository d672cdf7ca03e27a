"""Token shards, the tokenizer, and the deterministic rank-sharded loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx_trainer.data import (
    DistributedTokenLoader,
    PreparedData,
    prepare,
    token_dtype,
)
from phalanx_trainer.data_cli import main as data_main
from phalanx_trainer.termination import InvalidConfig

DOCS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(60)]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    out = tmp_path_factory.mktemp("small") / "data"
    return prepare(DOCS, out, vocab_size=300, val_every=10, shard_tokens=400)


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(2048, np.uint16), (65535, np.uint16), (65536, np.uint32), (128256, np.uint32)],
)
def test_token_dtype(vocab: int, dtype: type) -> None:
    assert token_dtype(vocab) == np.dtype(dtype)


def test_prepare_writes_shards_index_and_tokenizer(small_data: PreparedData) -> None:
    from tokenizers import Tokenizer

    index = json.loads((small_data.path / "index.json").read_text())
    assert index["dtype"] == "uint16"
    assert len(index["splits"]["train"]) > 1, "shard_tokens=400 must split the train set"
    tok = Tokenizer.from_file(str(small_data.tokenizer_path))
    assert tok.get_vocab_size() == small_data.vocab_size <= 300
    # Byte-level BPE round-trips arbitrary text, including characters never seen in training.
    text = "naïve façade → ✓"
    assert tok.decode(tok.encode(text).ids) == text
    first = np.fromfile(small_data.path / "train-00000.bin", dtype=np.uint16)
    expected = [*tok.encode(DOCS[0]).ids, small_data.eos_id]
    assert first[: len(expected)].tolist() == expected
    # Every 10th document is held out.
    assert small_data.num_tokens("val") > 0


def test_prepare_is_deterministic(small_data: PreparedData, tmp_path: Path) -> None:
    again = prepare(DOCS, tmp_path / "again", vocab_size=300, val_every=10, shard_tokens=400)
    for shard in small_data.splits["train"]:
        a = (small_data.path / shard["file"]).read_bytes()
        assert a == (again.path / shard["file"]).read_bytes()


def loader(
    data: PreparedData, rank: int = 0, world: int = 1, batch: int = 4
) -> DistributedTokenLoader:
    return DistributedTokenLoader(
        data, seq_len=16, micro_batch=batch, rank=rank, world_size=world, seed=3
    )


def test_targets_are_inputs_shifted(small_data: PreparedData) -> None:
    x, y = loader(small_data).next_batch()
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_ranks_partition_the_global_batch(small_data: PreparedData) -> None:
    """Two ranks with batch 2 see exactly what one rank with batch 4 sees, step after step."""
    single = loader(small_data, batch=4)
    ranks = [loader(small_data, rank=r, world=2, batch=2) for r in range(2)]
    for _ in range(30):  # crosses an epoch boundary
        whole, _ = single.next_batch()
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        torch.testing.assert_close(parts, whole)


def test_epoch_covers_every_window_once(small_data: PreparedData) -> None:
    ld = loader(small_data, batch=1)
    seen = {tuple(ld.next_batch()[0][0].tolist()) for _ in range(ld.num_windows)}
    assert len(seen) == ld.num_windows


def test_state_dict_resumes_the_sequence(small_data: PreparedData) -> None:
    a = loader(small_data)
    for _ in range(5):
        a.next_batch()
    b = loader(small_data)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        torch.testing.assert_close(a.next_batch()[0], b.next_batch()[0])


def test_state_from_another_seq_len_is_rejected(small_data: PreparedData) -> None:
    other = DistributedTokenLoader(small_data, seq_len=8, micro_batch=1, seed=3)
    with pytest.raises(InvalidConfig, match="seq_len"):
        loader(small_data).load_state_dict(other.state_dict())


def test_data_cli_prepares_text_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, doc in enumerate(DOCS[:20]):
        (texts / f"{i:02d}.txt").write_text(doc)
    assert (
        data_main(["prepare", str(texts), "--out", str(tmp_path / "out"), "--vocab-size", "280"])
        == 0
    )
    data = PreparedData.open(tmp_path / "out")
    assert data.num_tokens("train") > 0
    assert "train" in capsys.readouterr().out


def test_open_explains_a_missing_index(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="phalanx-data prepare"):
        PreparedData.open(tmp_path)


def test_builtin_corpus_is_local_and_deterministic(tmp_path: Path) -> None:
    from phalanx_trainer.corpus import pydoc_topics, stdlib_docstrings

    topics = list(pydoc_topics())
    assert sum(map(len, topics)) > 100_000
    (tmp_path / "b.py").write_text('"""' + "B " * 150 + '"""\nimport os\nos._exit(1)\n')
    (tmp_path / "a.py").write_text('def f():\n    """' + "A " * 150 + '"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    # Parsed, never imported (b.py would exit), in file order, broken files skipped.
    docs = list(stdlib_docstrings(tmp_path))
    assert [d[0] for d in docs] == ["A", "B"]
