"""Model shapes, parameter names, presets, and the FLOP formula."""

from __future__ import annotations

import pytest
import torch

from phalanx_trainer.model import ModelConfig, Transformer


def tiny_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nano", "gpt2-small", "1b"])
def test_preset_param_count_matches_model(name: str) -> None:
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("nano", 0.8e6, 1.5e6), ("gpt2-small", 115e6, 130e6), ("1b", 1.1e9, 1.3e9)],
    ids=["nano~1M", "gpt2-small~124M", "1b~1.2B"],
)
def test_preset_sizes(name: str, low: float, high: float) -> None:
    assert low < ModelConfig.preset(name).num_params() < high


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="nano"):
        ModelConfig.preset("huge")


def test_config_dict_round_trip() -> None:
    cfg = ModelConfig.preset("1b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_flops_per_token_is_6n_plus_attention() -> None:
    cfg = tiny_config(tie_embeddings=False)
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # the input lookup costs no FLOPs
    assert cfg.flops_per_token(16) == 6 * n + 12 * cfg.n_layers * cfg.dim * 16


def test_parameter_names() -> None:
    names = set(dict(Transformer(tiny_config()).named_parameters()))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected
    tied = set(dict(Transformer(tiny_config(tie_embeddings=True)).named_parameters()))
    assert tied == expected - {"output.weight"}


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(dim=256, ffn_dim=512, n_layers=8, n_heads=8, n_kv_heads=8))
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.005, rel=0.05)


def test_logits_are_causal() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 97, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 10, 97)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


class ConcatCache:
    """Minimal cache following the protocol: append k/v per layer, causal mask over the total."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        new = k.shape[2]
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        total = k.shape[2]
        # The new queries sit at the last `new` positions of `total`.
        query_pos = torch.arange(total - new, total)[:, None]
        mask = torch.arange(total)[None, :] <= query_pos
        return k, v, mask[None, None]


def test_prefill_then_decode_with_cache_matches_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 97, (1, 8))
    cache = ConcatCache()
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], torch.arange(5)[None], cache)]
        for pos in range(5, 8):
            steps.append(model(tokens[:, pos : pos + 1], torch.tensor([[pos]]), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_positions_offset_rows_independently() -> None:
    """A row shifted to start at position 3 sees the same relative rotary geometry."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        base = model(tokens)
        shifted = model(tokens, positions=torch.arange(3, 9)[None])
    # RoPE attention depends only on relative positions.
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    tokens = torch.randint(0, 97, (2, 12))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(tokens).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.activation_checkpointing = True
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
