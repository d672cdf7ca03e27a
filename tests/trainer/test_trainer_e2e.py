"""Train nano on the built-in corpus, then serve-side checks on the exported artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trainer_testkit import losses, run_in_process

from phalanx_trainer.data import DistributedTokenLoader, PreparedData, ensure_builtin_data
from phalanx_trainer.hf import load_pretrained
from phalanx_trainer.model import ModelConfig, Transformer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 100
# ln(2048) = 7.62 nats at init. A model that only learned token frequencies plateaus at the
# corpus' unigram entropy (6.40 nats); 100 steps of 1k tokens reach about 5.9.
MIN_LOSS_DROP = 1.0
BELOW_UNIGRAM = 0.2
HF_LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(builtin_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("e2e") / "ckpt"
    code = run_in_process(
        [
            "--preset", "nano",
            "--data-cache", str(builtin_cache),  # no --data: the built-in corpus
            "--checkpoint-dir", str(ckpt),
            "--steps", str(STEPS),
            "--batch-size", "16",
            "--seq-len", "64",
            "--lr", "3e-3",
            "--warmup-steps", "10",
            "--min-lr-ratio", "1.0",
            "--checkpoint-every", "0",
            "--export-every", "50",
            "--log-every", "10",
            "--metrics-port", "-1",
        ]
    )  # fmt: skip
    assert code == 0
    return ckpt


def val_loss(model: torch.nn.Module, data: PreparedData) -> float:
    loader = DistributedTokenLoader(data, seq_len=128, micro_batch=8, seed=0, split="val")
    inputs, targets = loader.next_batch()
    with torch.no_grad():
        logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


def unigram_entropy(data: PreparedData) -> float:
    tokens = np.concatenate(
        [np.fromfile(data.path / s["file"], dtype=data.dtype) for s in data.splits["train"]]
    )
    p = np.bincount(tokens.astype(np.int64)) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_loss_falls_on_builtin_corpus(trained: Path, prepared_data: Path) -> None:
    curve = losses(trained)
    # Means over the first and the last log interval (10 steps each) of the per-step log.
    first = sum(curve[s] for s in range(1, 11)) / 10
    last = sum(curve[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert first - last > MIN_LOSS_DROP, curve
    # Below the unigram entropy: the model uses context, not just token frequencies.
    assert last < unigram_entropy(PreparedData.open(prepared_data)) - BELOW_UNIGRAM, curve


def test_exported_model_reloads_and_generalises(trained: Path, builtin_cache: Path) -> None:
    model, cfg = load_pretrained(trained / "export")
    assert cfg == ModelConfig.preset("nano")
    data = ensure_builtin_data(cfg.vocab_size, builtin_cache)
    torch.manual_seed(0)
    untrained = Transformer(cfg).eval()
    assert val_loss(model, data) < val_loss(untrained, data) - MIN_LOSS_DROP


def test_exported_model_matches_transformers(trained: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours, _cfg = load_pretrained(trained / "export")
    theirs = transformers.LlamaForCausalLM.from_pretrained(trained / "export").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained / "export")
    ids = tokenizer("def hello(world):\n    return world", return_tensors="pt").input_ids
    assert ids.shape[1] > 5
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=HF_LOGITS_ATOL, rtol=0)


def test_step_exports_are_servable_snapshots(trained: Path) -> None:
    """--export-every publishes exports/step-N (what InferenceService fromTrainJob.step serves)."""
    snapshots = sorted(p.name for p in (trained / "exports").iterdir())
    assert snapshots == ["step-100", "step-50"]
    for name in snapshots:
        assert (trained / "exports" / name / "COMPLETE").exists()
    early, _ = load_pretrained(trained / "exports" / "step-50")
    final, _ = load_pretrained(trained / "export")
    at_end, _ = load_pretrained(trained / "exports" / "step-100")
    weight = "tok_embeddings.weight"
    assert not torch.equal(early.state_dict()[weight], final.state_dict()[weight])
    assert torch.equal(at_end.state_dict()[weight], final.state_dict()[weight])
