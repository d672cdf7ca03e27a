"""An InferenceService serving the export of an LLMTrainJob, through its Service, on real nodes.

The official `openai` SDK talks to the server through `kubectl port-forward service/<name>`
(the dev cluster has no kube-proxy: the API server forwards to the Service's ready pod).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from realkit import RealCluster, trainjob, wait_phase

from phalanx.devcluster.testing import Kubectl, wait_for


def inference_service(name: str, job: str, **model: Any) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"fromTrainJob": {"name": job, **model}},
            "replicas": 1,
            "accelerator": {"type": "cpu", "cpu": "500m", "memory": "2Gi"},
            "server": {"maxBatchSize": 4, "maxModelLen": 256},
        },
    }


def ready(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    lis = kubectl.json("get", "inferenceservices.phalanx.dev", name, "-n", namespace)
    conditions = {c["type"]: c for c in lis.get("status", {}).get("conditions", [])}
    return lis if conditions.get("Ready", {}).get("status") == "True" else None


@pytest.fixture
def port_forward(real_cluster: RealCluster) -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def forward(namespace: str, target: str, port: int) -> int:
        process = subprocess.Popen(
            [
                str(real_cluster.handle.kubectl_path),
                f"--kubeconfig={real_cluster.handle.kubeconfig}",
                "port-forward",
                "-n",
                namespace,
                target,
                f"0:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line!r}"
        return int(match.group(1))

    yield forward
    for process in started:
        process.terminate()
        process.wait(10)


def test_an_inference_service_serves_the_jobs_export_to_the_openai_sdk(
    real_cluster: RealCluster, namespace: str, port_forward: Any
) -> None:
    kubectl = real_cluster.kubectl
    kubectl.create(namespace, trainjob("source", steps=20, exportEvery=10))
    kubectl.create(namespace, inference_service("early", "source", step=10))
    kubectl.create(namespace, inference_service("final", "source"))

    # A snapshot export is served once it is on the claim, before the job ends.
    wait_for(
        lambda: ready(kubectl, namespace, "early"), 600, "InferenceService early Ready", interval=1
    )
    wait_phase(real_cluster, namespace, "source", "Succeeded", 600)
    wait_for(
        lambda: ready(kubectl, namespace, "final"), 600, "InferenceService final Ready", interval=1
    )

    port = port_forward(namespace, "service/final", 80)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    models = [model.id for model in client.models.list()]
    assert models
    completion = client.completions.create(
        model=models[0], prompt="The", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=models[0],
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces)
