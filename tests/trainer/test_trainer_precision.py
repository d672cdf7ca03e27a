"""FSDP2 mixed precision: bf16 parameters in compute, fp32 master weights and gradients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from phalanx_trainer.model import ModelConfig, Transformer
from phalanx_trainer.parallel import parallelize

CFG = ModelConfig(
    vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
    tie_embeddings=True,
)  # fmt: skip


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def train_loss(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.dtype]]:
    """One forward/backward; returns the loss and the weight dtype a block's matmul saw."""
    seen: list[torch.dtype] = []
    wq = model.layers[0].attention.wq  # type: ignore[index, union-attr]
    handle = wq.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    inputs, targets = batch()
    loss = model(inputs, targets=targets)
    loss.backward()
    handle.remove()
    return loss, seen


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_weights(one_rank_group: None) -> None:
    torch.manual_seed(0)
    reference, _ = train_loss(Transformer(CFG))
    torch.manual_seed(0)
    model = parallelize(
        Transformer(CFG), parallelism="fsdp", device=torch.device("cpu"), bf16_params=True
    )
    loss, seen = train_loss(model)
    assert seen == [torch.bfloat16]  # the unsharded parameter FSDP gathered for compute
    assert loss.dtype == torch.float32
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name
    # bf16 matmuls: the same loss to bf16's precision.
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)


def test_fsdp_fp32_computes_in_fp32(one_rank_group: None) -> None:
    model = parallelize(Transformer(CFG), parallelism="fsdp", device=torch.device("cpu"))
    _, seen = train_loss(model)
    assert seen == [torch.float32]
