"""Phalanx inference server: a continuous-batching engine behind an OpenAI-compatible API."""

from __future__ import annotations

__version__ = "0.1.0"
