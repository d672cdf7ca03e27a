"""Conversion between our checkpoints and the Hugging Face Llama format.

Our ``Transformer`` uses HF Llama's rotary convention (``rotate_half``), so the weights map by
name alone: no permutation of q/k projections is needed, and an exported directory *is* a
``LlamaForCausalLM`` checkpoint (``model.safetensors`` + ``config.json`` + ``tokenizer.json``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phalanx_trainer.model import ModelConfig, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Special tokens we look for in a tokenizer to fill bos/eos ids, in order of preference.
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|eot_id|>")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# (our name pattern, HF name pattern); {i} is the layer index.
_LAYER_RENAMES = (
    ("attention.wq", "self_attn.q_proj"),
    ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"),
    ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)
_TOP_RENAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def config_to_hf(
    cfg: ModelConfig,
    *,
    torch_dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        # transformers >= 4.56 reads "dtype"; older releases read "torch_dtype".
        "torch_dtype": _DTYPE_NAMES.get(torch_dtype, "float32"),
        "dtype": _DTYPE_NAMES.get(torch_dtype, "float32"),
    }
    if bos_token_id is not None:
        d["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        d["eos_token_id"] = eos_token_id
    return d


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Read a HF Llama ``config.json`` dict; rejects features our model does not implement."""
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"expected a Llama checkpoint, got model_type={d.get('model_type')!r}")
    rope_scaling = d.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise ValueError(
            f"rope_scaling {rope_scaling!r} is not supported; only unscaled rotary embeddings "
            "are implemented (remove rope_scaling to use the model at its original context)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"{flag}=true is not supported: the model has no biases")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    dim, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=int(d["vocab_size"]),
        dim=dim,
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        ffn_dim=int(d["intermediate_size"]),
        max_seq_len=int(d.get("max_position_embeddings", 2048)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def _rename(name: str, layer_re: re.Pattern[str], to_hf: bool) -> str:
    for ours, hf in _TOP_RENAMES:
        if name == (ours if to_hf else hf):
            return hf if to_hf else ours
    m = layer_re.match(name)
    if m:
        layer, inner = m.groups()
        for ours, hf in _LAYER_RENAMES:
            if inner == (ours if to_hf else hf):
                prefix = "model.layers" if to_hf else "layers"
                return f"{prefix}.{layer}.{hf if to_hf else ours}.weight"
    raise KeyError(f"no Llama mapping for parameter {name!r}")


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(k, _OUR_LAYER, to_hf=True): v for k, v in sd.items()}


def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # HF computes rotary tables on the fly too; very old exports stored them as buffers.
    return {
        _rename(k, _HF_LAYER, to_hf=False): v
        for k, v in sd.items()
        if not k.endswith("rotary_emb.inv_freq")
    }


def _special_token_id(tokenizer: Any, candidates: tuple[str, ...]) -> int | None:
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return None


def save_pretrained(
    model: nn.Module | dict[str, Any],
    cfg: ModelConfig,
    tokenizer: str | Path | Any | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a HF Llama checkpoint directory.

    ``model`` is a module or an already gathered full state dict (what FSDP produces);
    ``tokenizer`` is a ``tokenizer.json`` path, a ``tokenizers.Tokenizer``, or None.
    ``dtype`` casts floating weights (e.g. bf16 for serving); default keeps them as they are.
    """
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    # torch.compile wraps the module; its parameters gain an _orig_mod. prefix.
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict_to_hf(sd).items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    tok: Any = None
    if isinstance(tokenizer, str | Path):
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
        tok = Tokenizer.from_file(str(tokenizer))
    elif tokenizer is not None:
        tokenizer.save(str(out / TOKENIZER_FILE))
        tok = tokenizer
    bos = _special_token_id(tok, BOS_TOKENS) if tok is not None else None
    eos = _special_token_id(tok, EOS_TOKENS) if tok is not None else None

    saved_dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    hf_cfg = config_to_hf(cfg, torch_dtype=saved_dtype, bos_token_id=bos, eos_token_id=eos)
    _write_json(out / CONFIG_FILE, hf_cfg)
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    _write_json(
        out / GENERATION_CONFIG_FILE, {k: v for k, v in generation.items() if v is not None}
    )
    if tok is not None:
        tok_cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
        }
        if bos is not None:
            tok_cfg["bos_token"] = tok.id_to_token(bos)
        if eos is not None:
            tok_cfg["eos_token"] = tok.id_to_token(eos)
        _write_json(out / TOKENIZER_CONFIG_FILE, tok_cfg)
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / WEIGHTS_FILE
    if single.exists():
        return load_file(str(single))
    index = path / WEIGHTS_INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(load_file(str(path / shard)))
    return sd


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, ModelConfig]:
    """Load a HF Llama checkpoint directory (ours or compatible) into a ``Transformer``."""
    root = Path(path)
    cfg = config_from_hf(json.loads((root / CONFIG_FILE).read_text()))
    sd = state_dict_from_hf(_read_hf_weights(root))
    if cfg.tie_embeddings:
        # Some exporters write the tied lm_head anyway; it is the embedding table.
        sd.pop("output.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, cfg
