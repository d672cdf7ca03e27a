"""Our model, loaded through the trainer's HF loader, computes what HF transformers computes,
and decoding through the serving KV cache computes what a full forward pass computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from phalanx_serve.kv_cache import Chunk, DecodeView, PackedPrefillView, PagedKVCache
from phalanx_serve.model_runner import ServingModel
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


def _cache_for(model: Transformer, blocks: int, block_size: int = 4) -> PagedKVCache:
    cfg = model.cfg
    return PagedKVCache(
        n_layers=cfg.n_layers,
        num_blocks=blocks,
        block_size=block_size,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("serving", [False, True], ids=["trainer-forward", "serving-forward"])
def test_kv_cached_decoding_matches_full_forward(tmp_path: Path, serving: bool) -> None:
    """Three prompts of different lengths prefilled packed, in two chunks for the longest,
    into scattered blocks, then decoded together; by the trainer's forward and by the
    serving forward (fused projections) over the same weights."""
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=False), dtype=torch.float64)
    forward: Any = ServingModel(model) if serving else model
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    continuations = [torch.randint(0, 97, (6,), generator=gen).tolist() for _ in prompts]
    cache = _cache_for(model, blocks=16)
    # Blocks deliberately out of order and interleaved between sequences.
    tables = [[9, 2, 14], [0, 13, 5, 7, 1], [11, 3]]

    with torch.no_grad():
        first = [Chunk(tuple(tables[0]), 0, 5), Chunk(tuple(tables[1]), 0, 6)]
        second = [Chunk(tuple(tables[1]), 6, 11), Chunk(tuple(tables[2]), 0, 2)]
        prefill: dict[int, torch.Tensor] = {}
        parts: list[torch.Tensor] = []
        for chunks, owners in ((first, [0, 1]), (second, [1, 2])):
            view = PackedPrefillView(cache, chunks)
            packed = torch.tensor(
                [
                    [
                        prompts[o][p]
                        for c, o in zip(chunks, owners, strict=True)
                        for p in range(c.start, c.end)
                    ]
                ]
            )
            logits = forward(packed, positions=view.positions(), kv_cache=view)[0]
            offset = 0
            for c, o in zip(chunks, owners, strict=True):
                piece = logits[offset : offset + c.length]
                prefill[o] = piece if o not in prefill else torch.cat([prefill[o], piece])
                offset += c.length
            parts.append(logits)
        step_logits: list[torch.Tensor] = []
        for step in range(6):
            lengths = [len(p) + step for p in prompts]
            dview = DecodeView(cache, tables, lengths)
            tokens = torch.tensor([[c[step]] for c in continuations])
            step_logits.append(forward(tokens, positions=dview.positions(), kv_cache=dview)[:, 0])

        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            full = model(torch.tensor([p + c]))[0]
            torch.testing.assert_close(prefill[i], full[: len(p)], atol=1e-9, rtol=0)
            for step in range(6):
                torch.testing.assert_close(
                    step_logits[step][i], full[len(p) + step], atol=1e-9, rtol=0
                )


def test_shared_prefix_blocks_give_the_same_logits_as_recomputing(tmp_path: Path) -> None:
    """A second prompt reusing the first one's cached blocks computes only its own tail."""
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=True), dtype=torch.float64)
    cache = _cache_for(model, blocks=8)
    shared = [3, 1, 4, 1, 5, 9, 2, 6]  # two full blocks of 4
    a, b = [*shared, 5, 3], [*shared, 7]
    blocks = cache.blocks
    with torch.no_grad():
        table_a = [blocks.allocate() for _ in range(3)]
        view = PackedPrefillView(cache, [Chunk(tuple(table_a), 0, len(a))])
        model(torch.tensor([a]), positions=view.positions(), kv_cache=view)
        blocks.register(table_a, a, len(a))
        cached = blocks.lookup_prefix(b)
        assert cached == table_a[:2]
        table_b = [*cached, blocks.allocate()]
        view = PackedPrefillView(cache, [Chunk(tuple(table_b), len(shared), len(b))])
        tail = model(torch.tensor([b[len(shared) :]]), positions=view.positions(), kv_cache=view)
        full = model(torch.tensor([b]))[0, len(shared) :]
    torch.testing.assert_close(tail[0], full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_serving_forward_computes_only_the_requested_logit_rows(tmp_path: Path, tie: bool) -> None:
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=tie), dtype=torch.float64)
    serving = ServingModel(model)
    cache = _cache_for(model, blocks=8)
    tokens = [5, 8, 13, 21, 34, 55, 89]
    with torch.no_grad():
        view = PackedPrefillView(cache, [Chunk((0, 1), 0, len(tokens))], logit_rows=[2, 6])
        got = serving(torch.tensor([tokens]), positions=view.positions(), kv_cache=view)[0]
        full = model(torch.tensor([tokens]))[0]
    assert got.shape[0] == 2
    torch.testing.assert_close(got, full[[2, 6]], atol=1e-9, rtol=0)


def test_serving_forward_in_float32_matches_hf_llama(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    path = _tiny_llama(tmp_path, tie=False)
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model, _ = load_pretrained(path, dtype=torch.float32)
    serving = ServingModel(model)
    cache = PagedKVCache(
        n_layers=2, num_blocks=8, block_size=4, n_kv_heads=2, head_dim=16,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    tokens = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        view = PackedPrefillView(cache, [Chunk(tuple(range(6)), 0, 21)])
        got = serving(tokens, positions=view.positions(), kv_cache=view)
        expected = hf(tokens).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_decode_steps_reusing_gathered_keys_equal_gathering_every_step(tmp_path: Path) -> None:
    """Decode steps that append to the previous step's gathered keys (same sequences, one token
    longer) give bit for bit the logits of steps that gather every key from the blocks, also
    across a regrowth of the gathered batch and a change of the batch's sequences."""
    model, _ = load_pretrained(_tiny_llama(tmp_path, tie=False), dtype=torch.float64)
    serving = ServingModel(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    steps = 40  # past the gathered batch's headroom, so it is gathered again
    tokens = [torch.randint(0, 97, (steps,), generator=gen).tolist() for _ in prompts]
    tables = [[9, 2, 14, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [0, 13, 5, 7, 1, 30, 31, 32,
              33, 34, 35, 36, 37, 38], [11, 3, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48]]  # fmt: skip

    def run(with_ids: bool) -> list[torch.Tensor]:
        cache = _cache_for(model, blocks=64)
        out = []
        with torch.no_grad():
            for i, p in enumerate(prompts):
                view = PackedPrefillView(cache, [Chunk(tuple(tables[i]), 0, len(p))])
                serving(torch.tensor([p]), positions=view.positions(), kv_cache=view)
            for step in range(steps):
                # The last sequence leaves after 25 steps.
                live = [0, 1, 2] if step < 25 else [0, 1]
                lengths = [len(prompts[i]) + step for i in live]
                ids = tuple(i + 1 for i in live) if with_ids else None
                view = DecodeView(cache, [tables[i] for i in live], lengths, ids)
                step_tokens = torch.tensor([[tokens[i][step]] for i in live])
                out.append(serving(step_tokens, positions=view.positions(), kv_cache=view)[:, 0])
        return out

    reused, gathered = run(True), run(False)
    for a, b in zip(reused, gathered, strict=True):
        assert torch.equal(a, b)
