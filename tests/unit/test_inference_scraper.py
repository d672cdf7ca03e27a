"""Scraping leaders' /metrics: parsing the server's gauges and which pods are dialled."""

from __future__ import annotations

from typing import Any

from phalanx.handlers.scraper import parse_load, targets
from phalanx.handlers.state import Operator

PAGE = """\
# HELP phalanx_serve_num_requests_running Sequences in the running batch.
# TYPE phalanx_serve_num_requests_running gauge
phalanx_serve_num_requests_running{model_name="chat"} 3.0
# HELP phalanx_serve_num_requests_waiting Requests waiting for a slot.
# TYPE phalanx_serve_num_requests_waiting gauge
phalanx_serve_num_requests_waiting{model_name="chat"} 5.0
# TYPE phalanx_serve_prompt_tokens_total counter
phalanx_serve_prompt_tokens_total{model_name="chat"} 100.0
"""


def test_parse_load_sums_running_and_waiting() -> None:
    assert parse_load(PAGE) == (3.0, 5.0)


def test_parse_load_without_the_gauges_is_none() -> None:
    assert parse_load("# TYPE other gauge\nother 1\n") is None
    assert parse_load("not a metrics page {") is None


def leader(name: str, ip: str, worker: str = "0", ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "resourceVersion": "1",
            "labels": {"phalanx.dev/inference-service": "chat", "phalanx.dev/worker-index": worker},
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_targets_are_ready_leaders_of_autoscaled_services_loopback_only() -> None:
    op = Operator()
    op.cache.services.put(
        {
            "apiVersion": "phalanx.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u1", "resourceVersion": "1"},
            "spec": {
                "model": {"builtin": "tiny"},
                "autoscaling": {"maxReplicas": 3},
                "server": {"port": 9000},
            },
        }
    )
    for pod in (
        leader("chat-0-0", "127.244.0.1"),
        leader("chat-0-1", "127.244.0.2", worker="1"),
        leader("chat-1-0", "127.244.0.3", ready=False),
        leader("chat-2-0", "10.0.0.7"),
    ):
        op.cache.put_pod(pod)
    assert targets(op, loopback_only=True) == {("ml", "chat"): ["http://127.244.0.1:9000/metrics"]}
    assert targets(op, loopback_only=False)[("ml", "chat")] == [
        "http://127.244.0.1:9000/metrics",
        "http://10.0.0.7:9000/metrics",
    ]
