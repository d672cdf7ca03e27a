"""Phalanx trainer: the model, data pipeline, distributed training loop and checkpoints.

``ModelConfig`` and ``Transformer`` are re-exported lazily so that light entry points
(``phalanx-train --help``) answer without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phalanx_trainer.model import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from phalanx_trainer import model

        return getattr(model, name)
    raise AttributeError(f"module 'phalanx_trainer' has no attribute {name!r}")
