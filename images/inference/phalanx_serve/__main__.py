"""``python -m phalanx_serve`` runs the server CLI."""

from __future__ import annotations

from phalanx_serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
