"""Every Prometheus metric of the operator, in one registry.

Reconcile metrics keep controller-runtime's names so that existing dashboards and alerts for Go
operators work unchanged.
"""

from __future__ import annotations

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
RESTARTS = Counter(
    "phalanx_trainjob_restarts_total", "Gang restarts after a rank failed.", registry=REGISTRY
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
    ["namespace", "name", "kind"],
    registry=REGISTRY,
)
AUTOSCALER_DECISIONS = Counter(
    "phalanx_autoscaler_decisions_total",
    "Built-in autoscaler decisions by direction.",
    ["direction"],
    registry=REGISTRY,
)


def serve(port: int) -> None:
    """Expose /metrics on its own port, apart from kopf's liveness endpoint."""
    start_http_server(port, registry=REGISTRY)
