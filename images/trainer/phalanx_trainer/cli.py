"""`phalanx-train`: parse flags/env and run the training loop."""

from __future__ import annotations

from collections.abc import Sequence

from phalanx_trainer.config import load_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config(argv)
    # Imported late so `--help` answers without loading torch.
    from phalanx_trainer.train import run

    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
