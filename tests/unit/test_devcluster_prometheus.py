"""The shipped workload scrape configs and the dev cluster's Prometheus built from them."""

from __future__ import annotations

import re
from pathlib import Path

from builders.job import make_job
from builders.service import SERVICE, TINY, make_service
from prometheus_client.metrics import MetricWrapperBase

from phalanx import metrics as operator_metrics
from phalanx.devcluster import prometheus
from phalanx.render.inference import render_group
from phalanx.render.trainjob import JobRef, render_pod

JOBS = {job["job_name"]: job for job in prometheus.shipped_scrape_configs()}
POD_LABEL = re.compile(r"^__meta_kubernetes_pod_label_(\w+)$")


def _sanitized(label: str) -> str:
    """Prometheus' Kubernetes discovery name for a pod label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _sources(job: str) -> set[str]:
    return {
        match[1]
        for rule in JOBS[job]["relabel_configs"]
        for source in rule.get("source_labels", [])
        if (match := POD_LABEL.match(source))
    }


def _port_rule(job: str) -> re.Pattern[str]:
    (rule,) = (
        r
        for r in JOBS[job]["relabel_configs"]
        if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]
    )
    return re.compile(f"^(?:{rule['regex']})$")  # Prometheus anchors relabel regexes


def test_the_trainer_job_reads_labels_the_renderer_sets_and_keeps_every_rank_port() -> None:
    spec = make_job(nodes=2, accelerator={"type": "nvidia", "perNode": 8}).build()
    pod = render_pod(JobRef("gpt", "ml", "uid-1"), spec, rank=0, generation=1)
    labels = {_sanitized(k) for k in pod["metadata"]["labels"]}
    assert _sources("phalanx-trainer") <= labels
    ports = pod["spec"]["containers"][0]["ports"]
    keep = _port_rule("phalanx-trainer")
    scraped = sorted(p["containerPort"] for p in ports if keep.match(p["name"]))
    assert scraped == list(range(9400, 9408)), "one target per local rank"
    assert not any(keep.match(p["name"]) for p in ports if p["name"] == "rendezvous")


def test_the_inference_job_reads_labels_the_renderer_sets_on_leaders_and_workers() -> None:
    spec = make_service(nodesPerReplica=2)
    leader, worker = render_group(SERVICE, spec, TINY, 0, "r1")
    for pod in (leader, worker):
        assert _sources("phalanx-inference") <= {_sanitized(k) for k in pod["metadata"]["labels"]}
    keep = _port_rule("phalanx-inference")
    assert [p["name"] for p in leader["spec"]["containers"][0]["ports"] if keep.match(p["name"])]


def test_operator_series_use_no_label_a_scrape_overwrites() -> None:
    # What a scrape of the operator's pod (a ServiceMonitor, or a pod scrape like the shipped
    # ones) sets on every series it takes, and Prometheus' own job and instance.
    target = {"namespace", "pod", "node", "service", "endpoint", "container", "instance", "job"}
    collectors = [v for v in vars(operator_metrics).values() if isinstance(v, MetricWrapperBase)]
    clashes = {
        (collector._name, label)
        for collector in collectors
        for label in collector._labelnames
        if label in target
    }
    assert collectors
    assert not clashes, f"renamed to exported_* by a normal scrape: {sorted(clashes)}"


def test_render_config_keeps_the_shipped_relabelling_and_adds_the_operator() -> None:
    config = prometheus.render_config(
        list(JOBS.values()),
        kubeconfig=Path("/k/kubeconfig"),
        operator_target="127.0.0.1:18080",
        interval_seconds=1,
    )
    by_name = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, shipped in JOBS.items():
        assert by_name[name]["relabel_configs"] == shipped["relabel_configs"]
        assert by_name[name]["scrape_interval"] == "1s"
        assert all(
            sd["kubeconfig_file"] == "/k/kubeconfig"
            for sd in by_name[name]["kubernetes_sd_configs"]
        )
    (operator,) = by_name["phalanx-operator"]["static_configs"]
    assert operator["targets"] == ["127.0.0.1:18080"]
    assert operator["labels"]["namespace"] == prometheus.OPERATOR_NAMESPACE
