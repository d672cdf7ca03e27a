"""`phalanx-train`: parse flags/env, run the training loop, classify how it ended.

Every end becomes an exit code and, when ``$PHALANX_TERMINATION_LOG`` is set, one JSON line
in that file (see ``termination``): the first failing worker of a container writes it, and
rank 0 writes ``Completed`` with its export fields on success.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from phalanx_trainer.config import load_config
from phalanx_trainer.termination import conclude


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        cfg = load_config(argv, env)
    except BaseException as exc:  # every end is classified, then reported
        termination = conclude(exc, env)
        if termination is None:  # --help
            raise
        return termination.exit_code
    # Imported late so `--help` answers without loading torch.
    try:
        from phalanx_trainer.train import run
    except ModuleNotFoundError as error:  # one line, not a traceback
        raise SystemExit(
            f"phalanx-train needs the train extra ({error.name} is missing): "
            "pip install 'phalanx[train]'"
        ) from None

    return run(cfg, env).exit_code


if __name__ == "__main__":
    raise SystemExit(main())
