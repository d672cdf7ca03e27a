"""Rendering an InferenceService: group pods, their env, probes, model mounts and Services."""

from __future__ import annotations

from typing import Any

import pytest

from phalanx.api.inference import InferenceService, InferenceServiceSpec
from phalanx.constants import GANG_GATE
from phalanx.render.inference import (
    ModelMount,
    ServiceRef,
    render_client_service,
    render_group,
    render_peers_service,
    selector_string,
    template_revision,
)

REF = ServiceRef("chat", "ml", "uid-9")
TINY = ModelMount(path="builtin:tiny", revision="builtin:tiny")
EXPORT = ModelMount(path="/models/export", revision="gpt/export@abc", claim="gpt-checkpoint")


def make_spec(**fields: Any) -> InferenceServiceSpec:
    fields.setdefault("model", {"builtin": "tiny"})
    return InferenceService.model_validate({"spec": fields}).spec


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def test_single_pod_group_is_ungated_with_server_flags_and_health_probes() -> None:
    spec = make_spec(server={"maxBatchSize": 8, "maxModelLen": 512}, accelerator={"type": "cpu"})
    [pod] = render_group(REF, spec, TINY, 3, "rev1")
    assert pod["metadata"]["name"] == "chat-3-0"
    assert pod["metadata"]["labels"]["phalanx.dev/group"] == "3"
    assert pod["metadata"]["labels"]["phalanx.dev/worker-index"] == "0"
    assert pod["metadata"]["labels"]["phalanx.dev/revision"] == "rev1"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    assert "schedulingGates" not in pod["spec"]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["phalanx-serve"]
    assert container["args"] == [
        "--model", "builtin:tiny", "--port", "8000", "--served-model-name", "chat",
        "--max-batch-size", "8", "--max-model-len", "512", "--max-queue", "256",
        "--dtype", "auto",
    ]  # fmt: skip
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": 8000}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert "initialDelaySeconds" not in startup
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"] == {"requests": {}, "limits": {}}


def test_multi_pod_group_is_gated_with_leader_worker_env() -> None:
    spec = make_spec(nodesPerReplica=2, accelerator={"type": "nvidia", "perNode": 8})
    pods = render_group(REF, spec, TINY, 1, "rev1")
    assert [p["metadata"]["name"] for p in pods] == ["chat-1-0", "chat-1-1"]
    for worker, pod in enumerate(pods):
        assert pod["spec"]["schedulingGates"] == [{"name": GANG_GATE}]
        assert pod["spec"]["hostname"] == f"chat-1-{worker}"
        assert pod["spec"]["subdomain"] == "chat-peers"
        variables = env_of(pod)
        assert variables["PHALANX_LEADER_ADDRESS"] == "chat-1-0.chat-peers.ml.svc"
        assert variables["PHALANX_GROUP_SIZE"] == "2"
        assert variables["PHALANX_WORKER_INDEX"] == str(worker)
        assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}


def test_claim_model_is_mounted_read_only() -> None:
    [pod] = render_group(REF, make_spec(), EXPORT, 0, "rev1")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "gpt-checkpoint", "readOnly": True}
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}
    assert pod["spec"]["containers"][0]["args"][1] == "/models/export"


def test_overlay_merges_but_cannot_move_a_pod_out_of_its_group() -> None:
    spec = make_spec(
        podTemplate={
            "metadata": {"labels": {"phalanx.dev/group": "9", "team": "a"}},
            "spec": {"nodeSelector": {"pool": "serve"}},
        }
    )
    [pod] = render_group(REF, spec, TINY, 0, "rev1")
    assert pod["metadata"]["labels"]["phalanx.dev/group"] == "0"
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["spec"]["nodeSelector"] == {"pool": "serve"}


def test_services_select_ready_leaders_and_name_every_pod() -> None:
    spec = make_spec()
    client = render_client_service(REF, spec)
    assert client["metadata"]["name"] == "chat"
    assert client["spec"]["selector"] == {
        "phalanx.dev/inference-service": "chat",
        "phalanx.dev/worker-index": "0",
    }
    assert client["spec"]["ports"][0]["port"] == 80
    assert client["spec"]["ports"][0]["targetPort"] == 8000
    peers = render_peers_service(REF, spec)
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert selector_string("chat") == (
        "phalanx.dev/inference-service=chat,phalanx.dev/worker-index=0"
    )


@pytest.mark.parametrize(
    ("change", "rolls"),
    [
        pytest.param({"replicas": 5}, False, id="scaling-does-not-roll"),
        pytest.param({"rollout": {"maxSurge": 2}}, False, id="rollout-strategy-does-not-roll"),
        pytest.param({"autoscaling": {"maxReplicas": 9}}, False, id="autoscaling-does-not-roll"),
        pytest.param({"server": {"maxBatchSize": 4}}, True, id="server-flags-roll"),
        pytest.param({"env": [{"name": "A", "value": "1"}]}, True, id="env-rolls"),
    ],
)
def test_revision_changes_only_with_the_pod_template(change: dict[str, Any], rolls: bool) -> None:
    base = template_revision(make_spec(replicas=1), TINY)
    changed = template_revision(make_spec(**{"replicas": 1, **change}), TINY)
    assert (base != changed) is rolls


def test_revision_changes_with_the_model() -> None:
    spec = make_spec()
    other = ModelMount(path="/models/export", revision="gpt/export@def", claim="gpt-checkpoint")
    assert template_revision(spec, EXPORT) != template_revision(spec, other)
