"""The operator's /metrics, scraped by a real Prometheus (Debian's `prometheus` binary)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jobkit import Jobs, outcome

from phalanx.devcluster.testing import Kubectl, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Start Prometheus on loopback; returns a function that configures a scrape target port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` binary is missing: apt-get install prometheus", pytrace=False)
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: phalanx-operator\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n",
            encoding="utf-8",
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200,
            30,
            "Prometheus to be ready",
        )
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def query(url: str, expression: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?query={urllib.parse.quote(expression)}", timeout=5
    ) as response:
        body = json.load(response)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_reconcile_placement_and_phase_metrics(
    kubectl: Kubectl,
    namespace: str,
    run_operator: Callable[..., Any],
    prometheus: Callable[[int], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("PHALANX_METRICS_PORT", str(port))
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")
    url = prometheus(port)
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        jobs.apply(
            "scraped",
            nodes=2,
            accelerator={"type": "nvidia", "perNode": 8},
            podTemplate=outcome("Succeeded", "60s"),
        )
        jobs.wait_phase("scraped", "Running", timeout=60)

        def scraped() -> bool:
            up = query(url, 'up{job="phalanx-operator"}')
            running = query(url, 'phalanx_trainjobs{phase="Running"}')
            placed = query(url, "sum(phalanx_placement_level_total)")
            reconciles = query(
                url,
                'sum(controller_runtime_reconcile_total{controller="llmtrainjob",result="success"})',
            )
            return bool(
                up
                and up[0]["value"][1] == "1"
                and running
                and float(running[0]["value"][1]) >= 1
                and placed
                and float(placed[0]["value"][1]) >= 1
                and reconciles
                and float(reconciles[0]["value"][1]) >= 1
            )

        wait_for(
            scraped,
            60,
            "Prometheus to scrape the operator's reconcile, placement and phase metrics",
            interval=1,
        )
        gpus = query(url, "phalanx_gpus_allocated")
        assert float(gpus[0]["value"][1]) >= 16
        requests = query(url, 'sum(phalanx_api_requests_total{verb="patch"})')
        assert float(requests[0]["value"][1]) >= 2
