"""The Events the operator writes: every timestamp set, and the key repeats aggregate under."""

from __future__ import annotations

from datetime import UTC, datetime

from phalanx.status import event_body, event_key, event_repeat

NOW = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
JOB = {
    "apiVersion": "phalanx.dev/v1alpha1",
    "kind": "LLMTrainJob",
    "metadata": {"name": "gpt", "namespace": "ml", "uid": "u-1"},
}


def test_a_new_event_has_every_timestamp_and_a_count_of_one() -> None:
    body = event_body(JOB, "Warning", "GangTimeout", "x" * 2000, NOW, "operator-7f9")

    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-03-04T05:06:07Z"
    assert body["eventTime"] == "2026-03-04T05:06:07.890123Z"
    assert body["count"] == 1
    assert (body["action"], body["reportingInstance"]) == ("GangTimeout", "operator-7f9")
    assert body["involvedObject"]["uid"] == "u-1"
    assert len(body["message"]) == 1024


def test_repeats_share_a_key_and_differ_by_any_of_its_parts() -> None:
    key = event_key(JOB, "Warning", "GangTimeout", "rank 1 stuck")
    assert key == event_key(JOB, "Warning", "GangTimeout", "rank 1 stuck")
    other = {**JOB, "metadata": {**JOB["metadata"], "uid": "u-2"}}
    assert (
        len(
            {
                key,
                event_key(JOB, "Normal", "GangTimeout", "rank 1 stuck"),
                event_key(JOB, "Warning", "Admitted", "rank 1 stuck"),
                event_key(JOB, "Warning", "GangTimeout", "rank 2 stuck"),
                event_key(other, "Warning", "GangTimeout", "rank 1 stuck"),
            }
        )
        == 5
    )


def test_a_repeat_raises_the_count_and_moves_the_last_timestamp() -> None:
    assert event_repeat(4, NOW) == {"count": 4, "lastTimestamp": "2026-03-04T05:06:07Z"}
