"""Where the dev cluster keeps binaries, build work dirs and cluster state."""

from __future__ import annotations

import os
from pathlib import Path

from phalanx.devcluster.versions import KUBERNETES_VERSION


def cache_root() -> Path:
    """`$PHALANX_CACHE_DIR`, else `$XDG_CACHE_HOME/phalanx`, else `~/.cache/phalanx`."""
    explicit = os.environ.get("PHALANX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "phalanx"


def bin_dir(version: str = KUBERNETES_VERSION) -> Path:
    return cache_root() / "bin" / version


def build_dir() -> Path:
    """Scratch Go modules that pin and build the upstream releases (never inside the repo)."""
    return cache_root() / "build"


def default_state_dir(name: str = "default") -> Path:
    return cache_root() / "dev" / name
