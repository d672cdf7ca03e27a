"""The chunked cross-entropy equals the plain loss over full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

from phalanx_trainer.loss import IGNORE_INDEX, linear_cross_entropy, plain_cross_entropy
from phalanx_trainer.model import ModelConfig, Transformer

VOCAB, DIM = 97, 32


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 20, DIM, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, DIM, generator=g, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 20), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 60, 4096], ids=["one-token", "uneven", "exact", "one"])
def test_chunked_equals_plain_in_fp32(chunk: int) -> None:
    hidden, weight, targets = inputs()
    plain = plain_cross_entropy(hidden, weight, targets)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_ignored_targets_leave_the_loss_and_the_mean() -> None:
    hidden, weight, targets = inputs(1)
    targets[0] = IGNORE_INDEX
    plain = plain_cross_entropy(hidden, weight, targets)
    chunked = linear_cross_entropy(hidden, weight, targets, chunk=9)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    kept = plain_cross_entropy(hidden[1:], weight, targets[1:])
    torch.testing.assert_close(chunked, kept, rtol=1e-6, atol=1e-6)


def test_under_bf16_autocast_it_matches_the_autocast_plain_loss() -> None:
    hidden, weight, targets = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_cross_entropy(hidden, weight, targets)
        chunked = linear_cross_entropy(hidden, weight, targets, chunk=16)
    assert chunked.dtype == torch.float32
    # Both multiply in bf16 and reduce in fp32; only the summation order differs.
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)


def test_model_training_loss_equals_cross_entropy_of_its_logits() -> None:
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
        max_seq_len=32, tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.loss_chunk = 5
    tokens = torch.randint(0, VOCAB, (2, 17))
    inputs_, targets = tokens[:, :-1], tokens[:, 1:]
    loss = model(inputs_, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(inputs_)
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
