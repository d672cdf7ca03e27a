"""`python -m phalanx.devcluster` runs the same commands as `phalanx dev`."""

from __future__ import annotations

from phalanx.devcluster.cli import app

if __name__ == "__main__":
    app(prog_name="phalanx dev")
