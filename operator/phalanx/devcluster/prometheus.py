"""A Prometheus beside the dev cluster, scraping what a cluster's Prometheus would.

It runs the workload scrape configs the chart ships (charts/phalanx/files/
prometheus-scrape-configs.yaml) unchanged but for the interval: pods are discovered through
the API server, relabelled into `llmtrainjob` / `inferenceservice`, and scraped at their pod
addresses. With real nodes it lives in the cluster's network namespace, where pod addresses
and the operator's metrics port are reachable, and a relay publishes its web port on the
machine's loopback. The binary is Prometheus built from the Go module proxy (`build.py`):
Debian's package is built without Kubernetes service discovery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.images import repository_root

SCRAPE_CONFIGS = Path("charts") / "phalanx" / "files" / "prometheus-scrape-configs.yaml"
# The operator's own metrics as a cluster's scrape sees them: a target in the operator's
# namespace, whose `namespace` label is why per-object series name theirs differently.
OPERATOR_NAMESPACE = "phalanx-system"


def shipped_scrape_configs(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or repository_root() / SCRAPE_CONFIGS
    try:
        configs = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DevClusterError(f"cannot read the shipped scrape configs {path}: {error}") from error
    if not isinstance(configs, list):
        raise DevClusterError(f"{path} must be a list of scrape configs")
    return configs


def render_config(
    workload_jobs: list[dict[str, Any]],
    *,
    kubeconfig: Path,
    operator_target: str,
    interval_seconds: float,
) -> dict[str, Any]:
    """prometheus.yml: the shipped workload jobs, discovering pods with `kubeconfig`, and the
    operator at `operator_target`, all scraped every `interval_seconds`."""
    interval = f"{interval_seconds:g}s"
    jobs = []
    for job in workload_jobs:
        discovery = [
            {**sd, "kubeconfig_file": str(kubeconfig)} for sd in job["kubernetes_sd_configs"]
        ]
        jobs.append({**job, "scrape_interval": interval, "kubernetes_sd_configs": discovery})
    operator = {
        "job_name": "phalanx-operator",
        "scrape_interval": interval,
        "static_configs": [
            {
                "targets": [operator_target],
                "labels": {"namespace": OPERATOR_NAMESPACE, "pod": "phalanx-operator"},
            }
        ],
    }
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [*jobs, operator],
    }


def command(binary: str, config: Path, data: Path, port: int) -> tuple[str, ...]:
    return (
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address=127.0.0.1:{port}",
    )
