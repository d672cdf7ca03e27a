"""A real Prometheus scrapes the real trainer and server pods through the chart's shipped scrape
configs, and every query of the shipped Grafana dashboards returns data for one LLMTrainJob and
one InferenceService.

Prometheus runs beside the cluster (`phalanx dev prometheus`), in its network namespace,
discovering pods through the API server; the operator is scraped as a target in its own
namespace, as a cluster's Prometheus would see it.
"""

from __future__ import annotations

import time
from typing import Any

import openai
from promkit import Prometheus, missing, unlisted
from realkit import RealCluster, inference_service, phase, ready, trainjob, wait_phase

from phalanx.devcluster.testing import wait_for

JOB = "observed"
SERVICE = "observed-chat"
STEPS = 80


def test_dashboards_answer_for_one_job_and_one_service(
    real_cluster: RealCluster, namespace: str, port_forward: Any
) -> None:
    prometheus = Prometheus(real_cluster.cluster.start_prometheus(interval_seconds=1))
    kubectl = real_cluster.kubectl

    def operator_scraped() -> bool:
        return any(
            t["labels"].get("job") == "phalanx-operator" and t["health"] == "up"
            for t in prometheus.targets()
        )

    # Scraped before the job exists, as in a cluster: its admission is an increase Prometheus saw.
    wait_for(operator_scraped, 120, "Prometheus scraping the operator", interval=1)
    # A stated peak makes MFU known on CPU (without one the series is absent, as it should be).
    kubectl.create(namespace, trainjob(JOB, steps=STEPS, extraArgs=["--peak-flops", "1e11"]))
    training = {"namespace": namespace, "llmtrainjob": JOB}

    def trainer_scraped() -> bool:
        return any(
            t["labels"].get("llmtrainjob") == JOB and t["health"] == "up"
            for t in prometheus.targets()
        )

    wait_for(trainer_scraped, 300, f"Prometheus scraping the trainer pods of {JOB}", interval=1)
    # Each rank is its own target, named by the relabelling.
    step = f'phalanx_train_step{{llmtrainjob="{JOB}", namespace="{namespace}"}}'

    def both_ranks() -> list[dict[str, Any]] | None:
        found = prometheus.query(step)
        return found if len(found) == 2 else None

    ranks = wait_for(both_ranks, 120, "a step series from each rank", interval=1)
    assert {r["metric"]["rank"] for r in ranks} == {"0", "1"}
    assert len({r["metric"]["node"] for r in ranks}) == 2, ranks

    # While the job trains, every training panel fills (checkpoint saves included).
    deadline = time.monotonic() + 600
    while True:
        training_still = phase(kubectl, namespace, JOB) != "Succeeded"
        if not (empty := missing(prometheus, "training.json", training)):
            break
        assert training_still, f"{JOB} ended, and these panels never had data: {empty}"
        assert time.monotonic() < deadline, f"training panels without data: {empty}"
        time.sleep(2)
    assert not unlisted(prometheus, "training.json", training)
    wait_phase(real_cluster, namespace, JOB, "Succeeded", 600)

    lis = inference_service(SERVICE, JOB)
    kubectl.create(namespace, lis)
    wait_for(lambda: ready(kubectl, namespace, SERVICE), 600, f"{SERVICE} Ready", interval=1)
    port = port_forward(namespace, f"service/{SERVICE}", 80)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    serving = {"namespace": namespace, "inferenceservice": SERVICE}
    deadline = time.monotonic() + 300
    while True:
        # Traffic keeps the rate() windows of the latency and throughput panels filled.
        client.completions.create(model=model, prompt="Once upon", max_tokens=6, temperature=0)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True
        )
        assert [chunk for chunk in stream if chunk.choices]
        if not (empty := missing(prometheus, "inference.json", serving)):
            break
        assert time.monotonic() < deadline, f"inference panels without data: {empty}"
        time.sleep(2)
    assert not unlisted(prometheus, "inference.json", serving)
