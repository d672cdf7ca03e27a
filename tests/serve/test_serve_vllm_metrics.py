"""``--vllm-metrics``: the server's metrics under vLLM's names, as vLLM's own Grafana dashboard
reads them, through a real Prometheus (Debian's ``prometheus`` binary) scraping the server."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from vllm_dashboard import MODEL_VARIABLE_LABEL, PANELS

from phalanx_serve.cli import settings_from_args

# Grafana's $__rate_interval is at least four scrape intervals; the window also has to reach
# back over the traffic sent before the queries run.
RATE_INTERVAL = "30s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]  # type: ignore[no-any-return]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` binary is missing: apt-get install prometheus", pytrace=False)
    processes: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: phalanx-serve\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n",
            encoding="utf-8",
        )
        port = _free_port()
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
        prom = Prometheus(f"http://127.0.0.1:{port}")
        _wait(lambda: _ready(prom), 30, "Prometheus to be ready")
        return prom

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def _ready(prom: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _finite(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (a quantile over no observations is NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _substitute(expr: str, model: str) -> str:
    return expr.replace("$model_name", model).replace("$__rate_interval", RATE_INTERVAL)


def _traffic(url: str, stop: threading.Event) -> int:
    """Requests of every kind the panels show: streamed and not, n > 1, stop and length."""
    sent = 0
    bodies: list[dict[str, Any]] = [
        {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0},
        {"prompt": "def main():", "max_tokens": 6, "temperature": 0.8, "n": 2, "seed": 1},
        {"prompt": [5, 17, 300], "max_tokens": 8, "stream": True, "ignore_eos": True},
        {"prompt": "import", "max_tokens": 20, "stop": [" "], "temperature": 0},
    ]
    with httpx.Client(base_url=url + "/v1", timeout=60) as client:
        while not stop.is_set():
            body = bodies[sent % len(bodies)]
            r = client.post("/completions", json={"model": "tiny", **body})
            assert r.status_code == 200, r.text
            sent += 1
    return sent


def test_vllm_dashboard_queries_return_data_from_a_real_prometheus(
    make_server: Callable[..., LiveServer], prometheus: Callable[[str], Prometheus]
) -> None:
    server = make_server(vllm_metrics=True)
    prom = prometheus(server.url.removeprefix("http://"))
    stop = threading.Event()
    counts: list[int] = []
    worker = threading.Thread(target=lambda: counts.append(_traffic(server.url, stop)))
    worker.start()
    try:
        # Traffic across several scrapes, so every rate() window sees counters grow.
        _wait(
            lambda: (
                _finite(prom.query("vllm:generation_tokens_total"))
                and len(prom.query("vllm:generation_tokens_total[1m]")[0]["values"]) >= 5
            ),
            60,
            "five scrapes of vllm:generation_tokens_total",
        )
    finally:
        stop.set()
        worker.join(timeout=60)
    assert counts
    assert counts[0] > 0
    stopped = time.time()
    _wait(
        lambda: (
            float(prom.query("timestamp(vllm:generation_tokens_total)")[0]["value"][1]) > stopped
        ),
        30,
        "a scrape after the last request finished",
    )

    models = prom.get(f"/api/v1/label/{MODEL_VARIABLE_LABEL}/values")
    assert "tiny" in models  # what the dashboard's $model_name variable offers
    empty = [
        f"{panel}: {expr}"
        for panel, exprs in PANELS.items()
        for expr in exprs
        if not _finite(prom.query(_substitute(expr, "tiny")))
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_vllm_names_count_what_the_phalanx_names_count(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server(vllm_metrics=True)
    # The warm-up generation at start-up counts too; compare what this request adds.
    n_count = server.metric("vllm:request_params_n_count", model_name="tiny")
    n_sum = server.metric("vllm:request_params_n_sum", model_name="tiny")
    max_sum = server.metric("vllm:request_max_num_generation_tokens_sum", model_name="tiny")
    with httpx.Client(base_url=server.url + "/v1", timeout=60) as client:
        r = client.post(
            "/completions",
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "n": 3, "temperature": 0.7},
        )
        assert r.status_code == 200
    used = r.json()["usage"]
    for name in ("generation_tokens_total", "prompt_tokens_total"):
        ours = server.metric(f"phalanx_serve_{name}", model_name="tiny")
        assert server.metric(f"vllm:{name}", model_name="tiny") == ours > 0
    assert (
        server.metric("vllm:generation_tokens_total", model_name="tiny")
        >= (used["completion_tokens"])
    )
    # One request of three sequences: one per-request observation, n = 3.
    assert server.metric("vllm:request_params_n_count", model_name="tiny") == n_count + 1
    assert server.metric("vllm:request_params_n_sum", model_name="tiny") == n_sum + 3
    assert (
        server.metric("vllm:request_max_num_generation_tokens_sum", model_name="tiny")
        == max_sum + 5
    )
    assert server.metric(
        "vllm:request_success_total", model_name="tiny", finished_reason="length"
    ) == server.metric("phalanx_serve_request_success_total", finished_reason="length")
    # vLLM's older inter-token latency name carries the same observations.
    assert server.metric(
        "vllm:time_per_output_token_seconds_count", model_name="tiny"
    ) == server.metric("phalanx_serve_inter_token_latency_seconds_count", model_name="tiny")


def test_vllm_names_are_off_by_default_and_the_flag_turns_them_on(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = httpx.get(server.url + "/metrics").text
    assert "phalanx_serve_num_requests_running" in text
    assert "vllm:" not in text
    assert settings_from_args(["--model", "m", "--vllm-metrics", "true"]).vllm_metrics
    monkeypatch.setenv("PHALANX_SERVE_VLLM_METRICS", "true")
    assert settings_from_args(["--model", "m"]).vllm_metrics
