"""kwok configuration: the stages that play kubelet for fake nodes and their pods.

The stage YAML files ship in `phalanx/devcluster/stages/`; the annotation names below are the
contract that tests and demos use to steer a fake pod or node (see docs/devcluster.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# Pod annotations read by the pod-outcome stage.
FAKE_OUTCOME = "phalanx.dev/fake-outcome"  # "Succeeded" | "Failed"
FAKE_EXIT_CODE = "phalanx.dev/fake-exit-code"  # integer as a string; Failed defaults to "1"
FAKE_DURATION = "phalanx.dev/fake-duration"  # Go duration ("90s", "1m30s") spent Running first
# Node annotation read by the node stages: "false" turns a node NotReady until removed.
FAKE_NODE_READY = "phalanx.dev/fake-node-ready"
# kwok manages only nodes carrying this annotation, so real nodes are never touched.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"

STAGE_FILES = (
    "node-initialize.yaml",
    "node-heartbeat.yaml",
    "node-not-ready.yaml",
    "node-not-ready-heartbeat.yaml",
    "pod-ready.yaml",
    "pod-outcome.yaml",
    "pod-terminate.yaml",
    "pod-delete.yaml",
)
# kwok plays stages with 4 workers by default; more keep 1,000 nodes' heartbeats on time.
PLAY_PARALLELISM = 16


def load_stages() -> list[dict[str, Any]]:
    package = resources.files("phalanx.devcluster") / "stages"
    return [yaml.safe_load((package / name).read_text()) for name in STAGE_FILES]


def kwok_configuration() -> dict[str, Any]:
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "nodePlayStageParallelism": PLAY_PARALLELISM,
            "podPlayStageParallelism": PLAY_PARALLELISM,
        },
    }


def write_kwok_config(path: Path) -> Path:
    """One multi-document file: the configuration followed by every stage."""
    documents = [kwok_configuration(), *load_stages()]
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path
