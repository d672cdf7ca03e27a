"""``builtin:tiny``: a small model made on this machine, nothing downloaded.

The trainer's byte-level BPE tokenizer recipe (``phalanx_trainer.data.train_tokenizer``) trained
on the help texts shipped with Python (``pydoc_data``) and a randomly initialised nano-preset
transformer (untied output head) with a fixed seed. Its output is gibberish, but it exercises
the whole serving path, deterministically, in seconds. The result is an ordinary HF Llama
directory cached under ``$PHALANX_CACHE_DIR/models`` (default ``~/.cache/phalanx``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"tiny": "nano"}  # builtin name -> trainer preset
BUILTIN_VERSION = "v2"  # bump when the recipe changes, so stale caches are not reused
SEED = 1234


def cache_root() -> Path:
    env = os.environ.get("PHALANX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "phalanx"


def is_builtin(model: str) -> bool:
    return model.startswith(BUILTIN_PREFIX)


def ensure_builtin_model(model: str) -> Path:
    """Return the directory of a builtin model, creating it on first use."""
    name = model.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        choices = [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]
        raise ValueError(f"unknown builtin model {model!r}; choose one of {choices}")
    target = cache_root() / "models" / f"builtin-{name}-{BUILTIN_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent servers never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".builtin-{name}-", dir=target.parent))
    try:
        _build(BUILTIN_MODELS[name], tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(preset: str, out: Path) -> None:
    import torch

    from phalanx_trainer.corpus import pydoc_topics
    from phalanx_trainer.data import train_tokenizer
    from phalanx_trainer.hf import save_pretrained
    from phalanx_trainer.model import ModelConfig, Transformer

    base = ModelConfig.preset(preset)
    # The trainer's own tokenizer recipe, so a served builtin model tokenizes exactly like a
    # model the trainer made; only the corpus is smaller (help topics, no stdlib docstrings),
    # which keeps the first build to seconds.
    tokenizer = train_tokenizer(pydoc_topics(), base.vocab_size)
    # Untied output head: with tied random embeddings the logits are dominated by the input
    # token's own embedding and greedy decoding just repeats the last token, which would hide
    # any bug in how context reaches the next token.
    cfg = dataclasses.replace(base, vocab_size=tokenizer.get_vocab_size(), tie_embeddings=False)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = Transformer(cfg)
    finally:
        torch.random.set_rng_state(rng_state)
    save_pretrained(model, cfg, tokenizer, out)
