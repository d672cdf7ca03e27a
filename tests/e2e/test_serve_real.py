"""An InferenceService serving the export of an LLMTrainJob, through its Service, on real nodes.

The official `openai` SDK talks to the server through `kubectl port-forward service/<name>`
(the dev cluster has no kube-proxy: the API server forwards to the Service's ready pod).
"""

from __future__ import annotations

from typing import Any

import openai
from realkit import RealCluster, inference_service, ready, trainjob, wait_phase

from phalanx.devcluster.testing import wait_for


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
