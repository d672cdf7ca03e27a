"""Events the operator records carry every timestamp (so `kubectl describe` ages and orders
them), and a repeated event is one object whose count grows, as client-go's recorder does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from jobkit import job_manifest

from phalanx import kube
from phalanx.devcluster.testing import Kubectl


def events_of(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = kubectl.json(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )
    return sorted(listing["items"], key=lambda e: e["reason"])


def test_events_have_timestamps_and_repeats_aggregate(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    kubectl.create(namespace, job_manifest("noted", accelerator={"type": "cpu"}))
    job = kubectl.json("get", "llmtrainjob", "noted", "-n", namespace)
    start = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    recorder = kube.EventRecorder()

    recorder.record(job, "Warning", "GangTimeout", "rank 1 did not start", start)
    recorder.record(
        job, "Warning", "GangTimeout", "rank 1 did not start", start + timedelta(seconds=30)
    )
    recorder.record(
        job, "Warning", "GangTimeout", "rank 1 did not start", start + timedelta(seconds=90)
    )
    recorder.record(job, "Normal", "Admitted", "placed on rack r1", start + timedelta(seconds=95))

    admitted, timeout = events_of(kubectl, namespace, "noted")
    assert (timeout["reason"], timeout["count"]) == ("GangTimeout", 3)
    assert timeout["firstTimestamp"] == "2026-01-02T03:04:05Z"
    assert timeout["lastTimestamp"] == "2026-01-02T03:05:35Z"
    assert timeout["eventTime"] == "2026-01-02T03:04:05.678901Z"
    assert timeout["involvedObject"]["uid"] == job["metadata"]["uid"]
    assert (admitted["reason"], admitted["count"]) == ("Admitted", 1)
    assert admitted["firstTimestamp"] == admitted["lastTimestamp"] == "2026-01-02T03:05:40Z"
    described = kubectl("describe", "llmtrainjob", "noted", "-n", namespace).stdout
    assert "<unknown>" not in described.split("Events:")[1]
    assert "(x3 over" in described


def test_an_event_deleted_meanwhile_is_recorded_anew(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    kubectl.create(namespace, job_manifest("renoted", accelerator={"type": "cpu"}))
    job = kubectl.json("get", "llmtrainjob", "renoted", "-n", namespace)
    recorder = kube.EventRecorder()
    recorder.record(job, "Normal", "Suspended", "suspended by spec")
    kubectl("delete", "events", "-n", namespace, "--all")

    recorder.record(job, "Normal", "Suspended", "suspended by spec")

    [event] = events_of(kubectl, namespace, "renoted")
    assert event["count"] == 1
