"""Our export is a Hugging Face Llama checkpoint: transformers loads it and agrees on logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phalanx_trainer.hf import (
    config_from_hf,
    config_to_hf,
    load_pretrained,
    save_pretrained,
    state_dict_from_hf,
    state_dict_to_hf,
)
from phalanx_trainer.model import ModelConfig, Transformer

# fp32 on CPU: the two implementations differ only in op order.
LOGITS_ATOL = 1e-4


def tiny(tie: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=101,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=128,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )


def test_state_dict_renames_round_trip() -> None:
    sd = Transformer(tiny(tie=False)).state_dict()
    hf = state_dict_to_hf(sd)
    assert "model.layers.1.mlp.gate_proj.weight" in hf
    assert "model.layers.0.post_attention_layernorm.weight" in hf
    assert "lm_head.weight" in hf
    back = state_dict_from_hf(hf)
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)


def test_unknown_parameter_is_rejected() -> None:
    with pytest.raises(KeyError, match="rotary"):
        state_dict_to_hf({"layers.0.attention.rotary.weight": torch.zeros(1)})


def test_config_round_trip() -> None:
    cfg = ModelConfig.preset("1b")
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_llama3_rope_scaling_is_rejected_clearly() -> None:
    d = config_to_hf(ModelConfig.preset("1b"))
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf(d)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers_llama(tmp_path: Path, tie: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny(tie)
    ours = Transformer(cfg).eval()
    save_pretrained(ours, cfg, None, tmp_path)

    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    hf_model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
        reloaded, reloaded_cfg = load_pretrained(tmp_path)
        again = reloaded(tokens)
    assert reloaded_cfg == cfg
    torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_save_pretrained_writes_tokenizer_and_special_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = tiny(tie=True)
    out = save_pretrained(Transformer(cfg), cfg, tok, tmp_path / "export", dtype=torch.bfloat16)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 0
    assert config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
