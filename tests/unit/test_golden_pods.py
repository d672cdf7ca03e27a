"""Whole rendered objects against reviewed golden files: a 4-node NCCL train job's rank 2 pod
and its children, and a 2-pod inference group. Any change to what a pod looks like shows up
here as a diff to review; regenerate with PHALANX_UPDATE_GOLDEN=1 after reviewing it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import make_job

from phalanx.api.inference import InferenceService
from phalanx.render.inference import ModelMount, ServiceRef, render_group
from phalanx.render.trainjob import JobRef, render_children, render_pod

GOLDEN = Path(__file__).parent / "golden"


def check(name: str, got: Any) -> None:
    path = GOLDEN / name
    if os.environ.get("PHALANX_UPDATE_GOLDEN") == "1":
        path.write_text(yaml.safe_dump(got, sort_keys=False, width=100))
    assert got == yaml.safe_load(path.read_text()), f"{name} differs from the reviewed golden file"


def nccl_job() -> Any:
    return make_job(
        nodes=4,
        accelerator={"type": "nvidia", "perNode": 8, "product": "NVIDIA-H100-80GB-HBM3"},
        topology={"required": "rack"},
        communication={"nccl": {"socketIfname": "eth0", "ibHca": "mlx5"}},
        trainer={"preset": "gpt2-small", "steps": 20000, "exportEvery": 1000},
        checkpoint={"size": "200Gi", "storageClassName": "shared-nfs"},
        env=[{"name": "HF_HOME", "value": "/checkpoints/hf"}],
    ).build()


@pytest.mark.parametrize("name", ["pod", "children"])
def test_four_node_nccl_job(name: str) -> None:
    ref, spec = JobRef("gpt", "ml", "uid-1"), nccl_job()
    got = (
        render_pod(ref, spec, rank=2, generation=3) if name == "pod" else render_children(ref, spec)
    )
    check(f"trainjob-nccl-4node-{name}.yaml", got)


def test_two_pod_inference_group() -> None:
    spec = InferenceService.model_validate(
        {
            "spec": {
                "model": {"claim": {"name": "weights", "path": "llama"}},
                "nodesPerReplica": 2,
                "accelerator": {"type": "nvidia", "perNode": 4},
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
            }
        }
    ).spec
    model = ModelMount("/models/llama", "claim:weights/llama", "weights")
    check(
        "inference-group-2pod.yaml",
        render_group(ServiceRef("chat", "ml", "uid-9"), spec, model, 1, "abc123"),
    )
