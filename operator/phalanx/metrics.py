"""Every Prometheus metric of the operator, in one registry.

Reconcile metrics keep controller-runtime's names so that existing dashboards and alerts for Go
operators work unchanged. Series about one object name it with the labels the workload scrape
gives trainer and server series (`llmtrainjob`, `inferenceservice`) and its namespace as
`<kind>_namespace`: a plain `namespace` label would be renamed `exported_namespace` by any
scrape of the operator's pod, which carries a `namespace` target label of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Total number of reconciliations per controller and result.",
    ["controller", "result"],
    registry=REGISTRY,
)
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller.",
    ["controller"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
TRAINJOBS = Gauge("phalanx_trainjobs", "LLMTrainJobs by phase.", ["phase"], registry=REGISTRY)
ADMISSION_WAIT = Histogram(
    "phalanx_gang_admission_wait_seconds",
    "Time from a gang being queued to all of its pods being placed.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
TRAINJOB_LABELS = ("llmtrainjob_namespace", "llmtrainjob")
SERVICE_LABELS = ("inferenceservice_namespace", "inferenceservice")
RESTARTS = Counter(
    "phalanx_trainjob_restarts_total",
    "Gang restarts after a rank failed, per LLMTrainJob.",
    TRAINJOB_LABELS,
    registry=REGISTRY,
)
# Goodput (docs/goodput.md), from status.goodput and status.stragglers after each write.
ETTR = Gauge(
    "phalanx_trainjob_ettr",
    "Effective training time ratio per LLMTrainJob: productive over held seconds, 0..1.",
    TRAINJOB_LABELS,
    registry=REGISTRY,
)
TIME_TO_RECOVER = Histogram(
    "phalanx_trainjob_time_to_recover_seconds",
    "From a failure observed until the restarted gang's step moved again.",
    TRAINJOB_LABELS,
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
LOST_STEPS = Counter(
    "phalanx_trainjob_lost_steps_total",
    "Steps recomputed after gang restarts (past the newest checkpoint), per LLMTrainJob.",
    TRAINJOB_LABELS,
    registry=REGISTRY,
)
STRAGGLERS = Gauge(
    "phalanx_trainjob_stragglers",
    "Ranks slower than failurePolicy.stragglers.factor x their gang's median for the window.",
    TRAINJOB_LABELS,
    registry=REGISTRY,
)
PROGRESS_CYCLE = Gauge(
    "phalanx_progress_cycle_seconds",
    "Seconds in which every rank of every running gang is polled once: the poll interval, "
    "or a multiple of it while the ranks exceed PHALANX_PROGRESS_BUDGET x interval (each "
    "gang's rank 0 is still polled every interval).",
    registry=REGISTRY,
)
# Hot spares (docs/placement.md#hot-spares): nodes kept free per domain for recovery.
SPARE_NODES = Gauge(
    "phalanx_spare_nodes",
    "Spare nodes kept for recovery, by whether a preemptible filler uses them (filled) or not (idle).",
    ["state"],
    registry=REGISTRY,
)
SPARE_PREEMPTIONS = Counter(
    "phalanx_spare_preemptions_total",
    "Preemptible fillers (LLMTrainJob gangs or other pods) preempted from spare nodes by a recovery.",
    ["kind"],
    registry=REGISTRY,
)
SPARE_RECOVERIES = Counter(
    "phalanx_spare_recoveries_total",
    "Recovering gangs placed again inside the domain they ran in, spares included.",
    registry=REGISTRY,
)
_GOODPUT_SERIES = (ETTR, TIME_TO_RECOVER, LOST_STEPS, STRAGGLERS)


def export_goodput(key: tuple[str, str]) -> None:
    """A job's goodput series exist from its first pass (an absent series reads as no data)."""
    for series in _GOODPUT_SERIES:
        series.labels(*key)


def forget_goodput(key: tuple[str, str]) -> None:
    for series in _GOODPUT_SERIES:
        with contextlib.suppress(KeyError):
            series.remove(*key)


def count_goodput(key: tuple[str, str], old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Move the goodput series by what one status write changed."""
    ETTR.labels(*key).set(float(new.get("ettr") or 0))
    lost = int(new.get("lostSteps") or 0) - int(old.get("lostSteps") or 0)
    if lost > 0:
        LOST_STEPS.labels(*key).inc(lost)
    recovered = new.get("lastRecoverySeconds")
    if int(new.get("recoveries") or 0) > int(old.get("recoveries") or 0) and recovered is not None:
        TIME_TO_RECOVER.labels(*key).observe(float(recovered))


LEADER = Gauge(
    "phalanx_operator_leader",
    "1 while this replica decides (it holds the leader Lease, or runs without leader "
    "election); 0 while it stands by.",
    registry=REGISTRY,
)
GPUS_ALLOCATED = Gauge(
    "phalanx_gpus_allocated",
    "Accelerators held by admitted gangs.",
    registry=REGISTRY,
)
PLACEMENTS = Counter(
    "phalanx_placement_level_total",
    "Gangs placed, by the topology level of the domain that held them.",
    ["level"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "phalanx_api_requests_total",
    "Requests the operator sent to the API server.",
    ["verb", "resource"],
    registry=REGISTRY,
)
INFERENCE_REPLICAS = Gauge(
    "phalanx_inference_replicas",
    "InferenceService replicas by kind (desired, ready).",
    [*SERVICE_LABELS, "kind"],
    registry=REGISTRY,
)
AUTOSCALER_DECISIONS = Counter(
    "phalanx_autoscaler_decisions_total",
    "Built-in autoscaler decisions per InferenceService, by direction.",
    [*SERVICE_LABELS, "direction"],
    registry=REGISTRY,
)


def serve(port: int) -> None:
    """Expose /metrics on its own port, apart from kopf's liveness endpoint."""
    start_http_server(port, registry=REGISTRY)
