"""Shared fixtures for the trainer tests.

torch stays on one thread: the suite shares two cores with other work, and one thread
also keeps CPU results deterministic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phalanx_trainer.data import ensure_builtin_data

torch.set_num_threads(1)

BUILTIN_VOCAB = 2048


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache holding the built-in corpus, prepared once per test session."""
    cache = tmp_path_factory.mktemp("data-cache")
    ensure_builtin_data(BUILTIN_VOCAB, cache)
    return cache


@pytest.fixture(scope="session")
def prepared_data(builtin_cache: Path) -> Path:
    return ensure_builtin_data(BUILTIN_VOCAB, builtin_cache).path
