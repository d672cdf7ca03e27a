"""Phalanx: gang-scheduled, topology-aware LLM training and inference on Kubernetes."""

from __future__ import annotations

__version__ = "0.1.0"
