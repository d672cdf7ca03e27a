"""The per-step training log, ``<checkpoint-dir>/train_log.jsonl``, that reads as one run.

One JSON object per optimizer step, in step order::

    {"step": 12, "loss": 3.41, "gradNorm": 0.82, "lr": 0.0006}

The last step of each log interval also carries ``tokensPerSecond`` (and ``mfu`` when the
peak is known); a step after which the model was evaluated carries ``valLoss`` and
``valPerplexity``. Losses are means over ranks; the gradient norm is the global norm before
clipping.

Steps reach the file at every log interval and before every checkpoint, so every step up to
a published checkpoint is in it. On resume from step N rank 0 rewrites the file keeping only
steps <= N: redone steps replace the ones the crash interrupted, never duplicate them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TRAIN_LOG_FILE = "train_log.jsonl"

Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    """Records of a log file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def kept_records(records: Iterable[Record], upto_step: int) -> list[Record]:
    """The log of a run resumed at ``upto_step``: one record per step <= it, later ones win."""
    by_step: dict[int, Record] = {}
    for record in records:
        if record["step"] <= upto_step:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def interval_start(step: int, log_every: int) -> int:
    """The last step before the log interval that contains ``step`` (intervals end on
    multiples of ``log_every``, whatever step a run resumed from)."""
    return (step - 1) // log_every * log_every


def interval_mean(records: Sequence[Record], after: int, upto: int, key: str) -> float | None:
    values = [r[key] for r in records if after < r["step"] <= upto and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def rewrite(path: Path, records: Sequence[Record]) -> None:
    """Replace the log atomically (write aside, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append(path: Path, records: Sequence[Record]) -> None:
    if not records:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
