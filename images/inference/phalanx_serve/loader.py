"""Loading a model directory (trainer export or HF Llama checkpoint) for serving."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from phalanx_serve.builtin import ensure_builtin_model, is_builtin
from phalanx_trainer.hf import config_from_hf, load_pretrained
from phalanx_trainer.model import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    # The trainer's Transformer when loaded; the serving forward (maybe a shard) once built.
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    dtype: torch.dtype
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # Half precision is what GPUs are fast at; CPUs lack fast bf16 kernels in general.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as text or as {"content": text}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(root: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(root / name).get("eos_token_id")
        if eos is not None:
            ids.extend(eos if isinstance(eos, list) else [eos])
            break
    eos_text = _token_text(_read_json(root / "tokenizer_config.json").get("eos_token"))
    if eos_text is not None and (tid := tokenizer.token_to_id(eos_text)) is not None:
        ids.append(tid)
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_model(
    model: str, *, device: str = "auto", dtype: str = "auto", weights: bool = True
) -> LoadedModel:
    """The model directory's weights, config and tokenizer; ``weights=False`` skips the weights
    (``model`` is then an empty module): what a server whose engine runs in another process
    needs to tokenize, detokenize and check requests."""
    root = ensure_builtin_model(model) if is_builtin(model) else Path(model)
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"{root} is not a model directory (no config.json)")
    if not (root / "tokenizer.json").exists():
        raise FileNotFoundError(f"{root} has no tokenizer.json; the server needs one")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    net: nn.Module
    if weights:
        net, cfg = load_pretrained(root, device=dev, dtype=dt)
    else:
        net, cfg = nn.Module(), config_from_hf(_read_json(root / "config.json"))
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok_cfg = _read_json(root / "tokenizer_config.json")
    template = tok_cfg.get("chat_template")
    if weights:
        log.info("loaded %s: %s on %s (%s)", root, cfg, dev, dt)
    return LoadedModel(
        model=net,
        config=cfg,
        tokenizer=tokenizer,
        path=root,
        eos_token_ids=_eos_ids(root, tokenizer),
        bos_token=_token_text(tok_cfg.get("bos_token")),
        eos_token=_token_text(tok_cfg.get("eos_token")),
        chat_template=template if isinstance(template, str) else None,
        dtype=dt,
        device=dev,
    )
