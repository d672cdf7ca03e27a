"""Our model, loaded through the trainer's HF loader, computes what HF transformers computes,
and decoding through the serving KV cache computes what a full forward pass computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phalanx_serve.kv_cache import DecodeView, PackedPrefillView, Segment, SlotKVCache
from phalanx_trainer.hf import load_pretrained
from phalanx_trainer.model import Transformer

# Logits are O(1). In float32 both implementations agree bit for bit on CPU today; in float64
# they differ by ~2e-7 because our RMSNorm and RoPE compute in float32 by design. 1e-5 absolute
# covers both and still catches any real mismatch (a wrong rotary convention or head layout
# moves logits by ~1e-1).
ATOL = 1e-5


def _tiny_llama(tmp_path: Path, *, tie: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # HF's init is tiny; larger weights make every layer matter
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp_path / f"llama-tie{tie}"
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_hf_llama(tmp_path: Path, tie: bool, dtype: torch.dtype) -> None:
    from transformers import LlamaForCausalLM

    path = _tiny_llama(tmp_path, tie=tie)
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    ours, cfg = load_pretrained(path, device="cpu", dtype=dtype)
    assert cfg.tie_embeddings is tie
    tokens = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _cache_for(model: Transformer, slots: int, max_len: int) -> SlotKVCache:
    cfg = model.cfg
    return SlotKVCache(
        n_layers=cfg.n_layers,
        max_slots=slots,
        n_kv_heads=cfg.n_kv_heads,
        max_len=max_len,
        head_dim=cfg.head_dim,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )


def test_kv_cached_decoding_matches_full_forward(tmp_path: Path) -> None:
    """Three prompts of different lengths prefilled packed, then decoded together."""
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=False), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    continuations = [torch.randint(0, 97, (6,), generator=gen).tolist() for _ in prompts]
    cache = _cache_for(model, slots=3, max_len=32)

    with torch.no_grad():
        segments, start = [], 0
        for slot, p in enumerate(prompts):
            segments.append(Segment(slot, start, len(p)))
            start += len(p)
        view = PackedPrefillView(cache, segments)
        packed = torch.tensor([[t for p in prompts for t in p]])
        prefill_logits = model(packed, positions=view.positions(), kv_cache=view)[0]
        view.commit()
        step_logits: list[torch.Tensor] = []
        for step in range(6):
            dview = DecodeView(cache, 3)
            tokens = torch.tensor([[c[step]] for c in continuations])
            step_logits.append(model(tokens, positions=dview.positions(), kv_cache=dview)[:, 0])
            dview.commit()

        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            full = model(torch.tensor([p + c]))[0]
            seg = segments[i]
            torch.testing.assert_close(
                prefill_logits[seg.start : seg.start + seg.length],
                full[: len(p)],
                atol=1e-9,
                rtol=0,
            )
            for step in range(6):
                torch.testing.assert_close(
                    step_logits[step][i], full[len(p) + step], atol=1e-9, rtol=0
                )


def test_slot_move_keeps_a_sequence_decodable(tmp_path: Path) -> None:
    """Retiring a sequence moves the last slot into the hole; decoding continues unchanged."""
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=True), dtype=torch.float64)
    a, b = [3, 1, 4, 1, 5], [9, 2, 6]
    cache = _cache_for(model, slots=2, max_len=16)
    with torch.no_grad():
        view = PackedPrefillView(cache, [Segment(0, 0, len(a)), Segment(1, len(a), len(b))])
        model(torch.tensor([a + b]), positions=view.positions(), kv_cache=view)
        view.commit()
        cache.move(1, 0)  # sequence a finished; b now lives in slot 0
        assert cache.lengths == [len(b), 0]
        dview = DecodeView(cache, 1)
        logits = model(torch.tensor([[7]]), positions=dview.positions(), kv_cache=dview)[0, 0]
        full = model(torch.tensor([[*b, 7]]))[0, -1]
    torch.testing.assert_close(logits, full, atol=1e-9, rtol=0)
