"""The per-step log's pure rules: what a resumed run keeps, and where intervals end."""

from __future__ import annotations

from pathlib import Path

import pytest

from phalanx_trainer.steplog import (
    interval_mean,
    interval_start,
    kept_records,
    read_records,
    rewrite,
)


def rec(step: int, loss: float = 1.0) -> dict[str, object]:
    return {"step": step, "loss": loss}


def test_resume_keeps_each_step_up_to_the_checkpoint_once() -> None:
    # Steps 1-5 logged, the crash came after 5, the run resumes from the checkpoint at 3;
    # a stale duplicate of step 2 (an older writer) loses to the later line.
    log = [rec(1), rec(2, 9.0), rec(2), rec(3), rec(4), rec(5)]
    assert kept_records(log, 3) == [rec(1), rec(2), rec(3)]
    assert kept_records(log, 0) == []


@pytest.mark.parametrize(
    ("step", "log_every", "after"),
    [(1, 4, 0), (4, 4, 0), (5, 4, 4), (7, 4, 4), (8, 4, 4), (15, 4, 12), (3, 1, 2)],
    ids=["first", "end-of-first", "start-of-second", "resumed-mid", "end", "last-short", "every"],
)
def test_intervals_end_on_multiples_of_log_every(step: int, log_every: int, after: int) -> None:
    assert interval_start(step, log_every) == after


def test_interval_mean_covers_only_its_steps() -> None:
    log = [rec(4, 10.0), rec(5, 1.0), rec(6, 2.0), rec(7, 3.0), rec(8, 6.0)]
    assert interval_mean(log, 4, 8, "loss") == 3.0
    assert interval_mean(log, 8, 12, "loss") is None


def test_torn_last_line_is_skipped_and_rewrite_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_records(path) == [{"step": 1, "loss": 2.0}]
    rewrite(path, [rec(1), rec(2)])
    assert read_records(path) == [rec(1), rec(2)]
    assert not path.with_name("train_log.jsonl.tmp").exists()
