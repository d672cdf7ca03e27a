"""`python -m phalanx_trainer` / `torchrun -m phalanx_trainer`: same as `phalanx-train`."""

from __future__ import annotations

from phalanx_trainer.cli import main

raise SystemExit(main())
