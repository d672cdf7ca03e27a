"""The goodput timeline (plan/goodput.py): each term against hand-computed timelines, and the
effective training time ratio against a scripted run whose truth is known."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from phalanx.plan.goodput import FOLD_SECONDS, Observation, account, settle

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(script: list[tuple[float, Observation]]) -> dict[str, Any]:
    goodput: dict[str, Any] | None = None
    for seconds, seen in script:
        goodput = account(goodput, seen, at(seconds))
    assert goodput is not None
    return goodput


def obs(**fields: Any) -> Observation:
    return Observation(**fields)


# A two-gang job, by hand: queued 10 s, starting 20 s, training 25 s, a crash 5 s after the
# last report (10 steps past the checkpoint at 1 s each), 20 s to train again, 20 s more.
HAND = [
    (0, obs()),
    (10, obs(admitted=True)),
    (20, obs(admitted=True, running=True, step=0, step_seconds=1.0)),
    (30, obs(admitted=True, running=True, step=10, advanced=True, step_seconds=1.0)),
    (
        50,
        obs(
            admitted=True,
            running=True,
            step=30,
            advanced=True,
            checkpoint_step=20,
            step_seconds=1.0,
            checkpoint_stall_seconds=2.0,
        ),
    ),
    (55, obs(generation=2, restarted=True)),
    (60, obs(generation=2, admitted=True)),
    (65, obs(generation=2, admitted=True, running=True, step=20, checkpoint_step=20)),
    (75, obs(generation=2, admitted=True, running=True, step=30, advanced=True)),
    (95, obs(generation=2, finished=True)),
]


def test_every_term_of_a_hand_computed_timeline() -> None:
    g = run(HAND)
    totals = {k: g[k] for k in (
        "queuedSeconds", "startingSeconds", "trainingSeconds", "checkpointSeconds",
        "restartSeconds", "lostSeconds", "productiveSeconds", "lostSteps", "recoveries",
        "lastRecoverySeconds", "state", "ettr",
    )}  # fmt: skip
    assert totals == {
        "queuedSeconds": 10.0,
        "startingSeconds": 20.0,
        "trainingSeconds": 45.0,
        "checkpointSeconds": 2.0,
        "restartSeconds": 20.0,
        # 5 s since the last report + 10 steps past checkpoint 20 at 1 s/step
        "lostSeconds": 15.0,
        "productiveSeconds": 28.0,
        "lostSteps": 10,
        "recoveries": 1,
        "lastRecoverySeconds": 20.0,
        "state": "Finished",
        "ettr": round(28 / (20 + 45 + 20), 4),
    }
    assert "failedAt" not in g


def test_recovery_in_progress_is_restart_time_and_names_the_failure() -> None:
    g = run(HAND[:7])
    assert g["state"] == "Restarting"
    assert g["failedAt"] == "2026-01-01T12:00:55.000000Z"
    assert g["restartSeconds"] == 5.0
    assert g["queuedSeconds"] == 10.0  # re-queueing after a failure is restart time


def test_no_checkpoint_loses_every_step_of_the_gang() -> None:
    g = run(
        [
            (0, obs(admitted=True, running=True, step=0, step_seconds=2.0)),
            (10, obs(admitted=True, running=True, step=5, advanced=True, step_seconds=2.0)),
            (20, obs(admitted=True, running=True, step=10, advanced=True, step_seconds=2.0)),
            (20, obs(generation=2, restarted=True)),
        ]
    )
    # 10 steps of 2 s, but the gang was seen training for 10 s only (since its first move)
    assert (g["lostSteps"], g["lostSeconds"], g["trainingSeconds"]) == (10, 10.0, 10.0)
    assert g["productiveSeconds"] == 0.0


def test_lost_time_never_exceeds_what_the_gang_trained() -> None:
    g = run(
        [
            (0, obs(admitted=True, running=True, step=0, step_seconds=50.0)),
            (10, obs(admitted=True, running=True, step=1, advanced=True, step_seconds=50.0)),
            (20, obs(generation=2, restarted=True)),
        ]
    )
    assert g["lostSeconds"] == g["trainingSeconds"] == 10.0


def test_a_hang_loses_the_time_since_the_step_last_moved() -> None:
    g = run(
        [
            (0, obs(admitted=True, running=True, step=100, advanced=True, checkpoint_step=100)),
            (10, obs(admitted=True, running=True, step=110, advanced=True, step_seconds=1.0)),
            (310, obs(admitted=True, running=True, step=110, advanced=True, checkpoint_step=100)),
            (310, obs(generation=2, restarted=True)),
        ]
    )
    assert g["lostSteps"] == 10
    assert g["lostSeconds"] == pytest.approx(300 + 10)  # stalled 300 s, 10 steps of 1 s


def test_the_silence_is_timed_from_when_the_poller_saw_the_step_move() -> None:
    # The pass that reads step 110 comes 4 s after the poll that saw it: the hang detector
    # times the silence from the poll, and so must the lost time it books.
    g = run(
        [
            (0, obs(admitted=True, running=True, step=100, advanced=True, checkpoint_step=110)),
            (14, obs(admitted=True, running=True, step=110, advanced=True, stepped_at=at(10))),
            (40, obs(generation=2, restarted=True)),
        ]
    )
    assert g["lostSteps"] == 0
    assert g["lostSeconds"] == pytest.approx(30)


def test_a_hang_restart_loses_at_least_the_stall_the_detector_measured() -> None:
    # The passes saw the gang train for only 20 s of the 30 s the poller saw its step stall
    # (a pass lags its poll): the hang still loses the whole stall.
    g = run(
        [
            (0, obs(admitted=True, running=True, step=100, advanced=True, checkpoint_step=100)),
            (20, obs(admitted=True, running=True, step=100, advanced=True)),
            (20, obs(generation=2, restarted=True, hang_seconds=30.0)),
        ]
    )
    assert g["lostSeconds"] == pytest.approx(30)


def test_trainer_stall_total_restarts_with_each_process() -> None:
    g = run(
        [
            (0, obs(admitted=True, running=True, step=0, checkpoint_stall_seconds=0.0)),
            (10, obs(admitted=True, running=True, step=5, advanced=True, checkpoint_stall_seconds=3.0)),
            (20, obs(admitted=True, running=True, step=9, advanced=True, checkpoint_stall_seconds=4.0)),
            # a new trainer process (an operator that missed the restart) reports from zero
            (30, obs(admitted=True, running=True, step=12, advanced=True, checkpoint_stall_seconds=1.5)),
        ]
    )  # fmt: skip
    assert g["checkpointSeconds"] == 5.5


def test_an_operator_restart_keeps_a_training_gang_training() -> None:
    g = run(HAND[:4])
    assert g["state"] == "Training"
    # The next operator's first poll sees the gang once, not yet moving.
    g = account(g, obs(admitted=True, running=True, step=12), at(40))
    assert g["state"] == "Training"
    assert g["trainingSeconds"] == 10.0


def test_suspended_time_is_not_held_time() -> None:
    g = run(
        [
            (0, obs(admitted=True, running=True, step=0)),
            (10, obs(admitted=True, running=True, step=10, advanced=True)),
            (20, obs(suspended=True)),
            (120, obs(generation=2)),
        ]
    )
    assert g["suspendedSeconds"] == 100.0
    assert g["ettr"] == 0.5  # 10 s trained of 20 s held: the 100 s suspended do not count


@pytest.mark.parametrize(
    ("moved", "after", "others", "written"),
    [
        pytest.param(False, FOLD_SECONDS - 1, False, False, id="only-totals-recently"),
        pytest.param(False, FOLD_SECONDS, False, True, id="only-totals-after-fold"),
        pytest.param(False, 1, True, True, id="status-changed-anyway"),
        pytest.param(True, 1, False, True, id="state-changed"),
    ],
)
def test_settle_writes_totals_at_most_every_fold(
    moved: bool, after: float, others: bool, written: bool
) -> None:
    before = run(HAND[:4])
    seen = HAND[3][1] if not moved else obs(generation=2, restarted=True)
    folded = account(before, seen, at(30 + after))
    assert (settle(before, folded, others) is folded) == written


# --- the scripted run -------------------------------------------------------------------


@dataclass
class Trainer:
    """One gang's trainer: a step every STEP s, a report every LOG_EVERY steps, a checkpoint
    every CHECKPOINT_EVERY steps that stalls the loop for STALL s."""

    started: float
    first_step: int
    reports: list[tuple[float, int, int | None, float]] = field(default_factory=list)

    def run_until(self, end: float, last_step: int, checkpoint: int | None) -> float:
        t, step, stall = self.started, self.first_step, 0.0
        self.reports.append((t, step, checkpoint, stall))
        while step < last_step and t + STEP <= end:
            t += STEP
            step += 1
            if step % CHECKPOINT_EVERY == 0:
                t += STALL
                stall += STALL
                checkpoint = step
            if step % LOG_EVERY == 0:
                self.reports.append((t, step, checkpoint, stall))
        return t

    def seen_at(self, t: float) -> tuple[int, int | None, float] | None:
        known = [r for r in self.reports if r[0] <= t]
        return known[-1][1:] if known else None


STEP, LOG_EVERY, CHECKPOINT_EVERY, STALL, POLL = 1.0, 5, 100, 3.0, 5.0
TOTAL_STEPS = 6000


def test_ettr_of_a_scripted_run_is_within_one_percent_of_the_truth() -> None:
    """Queued 60 s; pods running 10 s after placement, the trainer's first step 10 s later;
    a crash 2,000.5 s in; the new gang placed 15 s later, resuming from its checkpoint; the
    run finishes. Truth: every kept step cost STEP seconds of productive time."""
    admitted, running, crash = 60.0, 70.0, 2000.5
    first = Trainer(started=80.0, first_step=0)
    first.run_until(crash, TOTAL_STEPS, None)
    resumed_from = first.seen_at(crash)
    assert resumed_from is not None
    checkpoint = resumed_from[1]
    assert checkpoint is not None
    admitted2, running2 = crash + 15, crash + 25
    second = Trainer(started=crash + 35, first_step=checkpoint)
    end = second.run_until(1e9, TOTAL_STEPS, checkpoint)

    def observe(t: float) -> Observation:
        gang, gen = (first, 1) if t < crash else (second, 2)
        if t >= end:
            return obs(generation=2, finished=True)
        placed = t >= (admitted if gen == 1 else admitted2)
        up = t >= (running if gen == 1 else running2)
        report = gang.seen_at(t) if up else None
        if report is None:
            return obs(generation=gen, admitted=placed, running=up)
        step, ckpt, stall = report
        return obs(
            generation=gen,
            admitted=placed,
            running=up,
            step=step,
            advanced=step != gang.first_step,
            checkpoint_step=ckpt,
            step_seconds=STEP,
            checkpoint_stall_seconds=stall,
        )

    passes = sorted({*(i * POLL for i in range(int(end // POLL) + 1)), admitted, running,
                     admitted2, running2, end})  # fmt: skip
    goodput: dict[str, Any] | None = None
    for t in passes:
        if goodput is not None and t > crash and goodput.get("generation") == 1:
            report = first.seen_at(crash)
            assert report is not None
            step, ckpt, stall = report
            seen = obs(
                generation=2,
                restarted=True,
                step=step,
                advanced=True,
                checkpoint_step=ckpt,
                checkpoint_stall_seconds=stall,
                step_seconds=STEP,
            )
            goodput = account(goodput, seen, at(crash))
        goodput = account(goodput, observe(t), at(t))
    assert goodput is not None
    truth = TOTAL_STEPS * STEP / (end - admitted)
    assert goodput["state"] == "Finished"
    assert goodput["ettr"] == pytest.approx(truth, abs=0.01)
    assert goodput["queuedSeconds"] == admitted
    assert goodput["lostSteps"] == first.reports[-1][1] - checkpoint
    assert goodput["recoveries"] == 1


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies the shell's status patch: null deletes a key, a
    nested object is merged, never replaced."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def test_a_recovery_ends_for_good_through_the_servers_merge_patch() -> None:
    """What the API server keeps is what the next pass reads: an ended recovery must not stay
    behind as a nested key the patch never deleted."""
    stored: dict[str, Any] | None = None
    for seconds, seen in [*HAND[:9], (85, HAND[8][1]), (90, HAND[8][1])]:
        stored = merge_patch(stored, account(stored, seen, at(seconds)))
    assert stored is not None
    assert stored["recoveries"] == 1
    assert stored["lastRecoverySeconds"] == 20.0
    assert "failedAt" not in stored
    assert stored["state"] == "Training"
    assert all(value is not None for value in stored.values())
