"""The chart's PodMonitors carry exactly the relabelling of the shipped plain-Prometheus scrape
configs, so both setups label workload series the same way."""

from __future__ import annotations

from typing import Any

from test_chart import render

from phalanx.devcluster import prometheus

CAMEL = {"source_labels": "sourceLabels", "target_label": "targetLabel"}


def _as_relabeling(rule: dict[str, Any]) -> dict[str, Any]:
    return {"action": "replace", **{CAMEL.get(k, k): v for k, v in rule.items()}}


def _pod_monitors(*sets: str) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in render("podMonitors.enabled=true", *sets, api=("PodMonitor",))
        if d["kind"] == "PodMonitor"
    }


def test_pod_monitors_repeat_the_shipped_relabelling() -> None:
    shipped = prometheus.shipped_scrape_configs()
    monitors = _pod_monitors()
    assert sorted(monitors) == sorted(f"phalanx-{job['job_name']}" for job in shipped)
    for job in shipped:
        monitor = monitors[f"phalanx-{job['job_name']}"]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["relabelings"] == [_as_relabeling(r) for r in job["relabel_configs"]]
        assert monitor["spec"]["selector"] == {
            "matchLabels": {"app.kubernetes.io/part-of": "phalanx"}
        }
        assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_pod_monitors_follow_watch_namespaces() -> None:
    monitors = _pod_monitors("watchNamespaces={ml,research}")
    for monitor in monitors.values():
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}
