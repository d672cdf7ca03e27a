"""A rank's own pace on /progress: with one of three DDP ranks slowed (its process stopped for
most of every 100 ms), every rank's wall time per step is the slow rank's, and only the slow
rank's `ownStepSeconds` says it is the slow one."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from trainer_testkit import free_ports, launch, progress_of

from phalanx.devcluster.testing import duty_cycled

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RANKS = 3
SLOW = 2


def test_only_the_slowed_rank_reports_a_slow_own_pace(prepared_data: Path, tmp_path: Path) -> None:
    base = free_ports(RANKS)
    args = [
        "--data", str(prepared_data),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--steps", "100000",
        "--batch-size", "4",
        "--seq-len", "64",
        "--log-every", "5",
        "--eval-every", "0",
        "--checkpoint-every", "0",
        "--metrics-port", str(base),
    ]  # fmt: skip
    gang = launch(RANKS, args, tmp_path / "logs")
    samples: list[list[dict[str, float]]] = []
    try:
        with duty_cycled(gang.procs[SLOW].pid):
            seen = -1
            deadline = time.monotonic() + 300
            while len(samples) < 4 and time.monotonic() < deadline:
                assert gang.alive(), gang.log(SLOW)
                ranks = [progress_of(base + r) for r in range(RANKS)]
                step = min(int(p.get("step") or 0) for p in ranks)
                if all(p.get("ownStepSeconds") for p in ranks) and step >= 10 and step > seen:
                    samples.append(ranks)
                    seen = step + 5  # the next sample from a later interval
                time.sleep(0.5)
    finally:
        gang.kill()
    assert len(samples) == 4, f"only {len(samples)} samples:\n{gang.log()}"

    def median_of(field: str, rank: int) -> float:
        return statistics.median(float(s[rank][field]) for s in samples)

    own = [median_of("ownStepSeconds", r) for r in range(RANKS)]
    wall = [median_of("stepSeconds", r) for r in range(RANKS)]
    fast = [own[r] for r in range(RANKS) if r != SLOW]
    print(f"own seconds per step {own}, wall {wall}")
    # The slowed rank's own work takes well over the detector's default 1.5x of the others'.
    assert own[SLOW] > 1.8 * max(fast), (own, wall)
    # Every rank waits for it: their wall times per step agree, and exceed their own work.
    assert max(wall) < 1.3 * min(wall), (own, wall)
    assert all(wall[r] > 1.5 * own[r] for r in range(RANKS) if r != SLOW), (own, wall)
    for sample in samples:
        assert all(s["ownStepSeconds"] <= s["stepSeconds"] * 1.05 for s in sample), sample
