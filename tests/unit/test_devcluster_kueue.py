"""Kueue beside the dev cluster (devcluster/kueue.py): its webhooks called on loopback, only
for what exists here, and the topology-aware queue over the operator's own levels."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from phalanx.devcluster import kueue
from phalanx.devcluster.errors import DevClusterError
from phalanx.placement import Topology

MANIFESTS = textwrap.dedent(
    """\
    ---
    apiVersion: admissionregistration.k8s.io/v1
    kind: MutatingWebhookConfiguration
    metadata:
      name: mutating-webhook-configuration
    webhooks:
    - clientConfig:
        service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}
      name: mjob.kb.io
    - clientConfig:
        service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}
      name: mpod.kb.io
      failurePolicy: Fail
    - clientConfig:
        service:
          name: webhook-service
          namespace: system
          path: /mutate-kueue-x-k8s-io-v1beta2-clusterqueue
      name: mclusterqueue.kb.io
    ---
    apiVersion: admissionregistration.k8s.io/v1
    kind: ValidatingWebhookConfiguration
    metadata:
      name: validating-webhook-configuration
    webhooks:
    - clientConfig:
        service: {name: webhook-service, namespace: system, path: /validate-ray-io-v1-rayjob}
      name: vrayjob.kb.io
    """
)


def test_webhooks_keep_pods_and_kueues_own_kinds_called_by_url() -> None:
    hooks = kueue.webhooks(MANIFESTS, url="https://127.0.0.1:9443", ca_bundle="Q0E=")
    assert [h["metadata"] for h in hooks] == [
        {"name": "kueue-mutating-webhook-configuration", "labels": {"phalanx.dev/peer": "kueue"}}
    ]
    kept = hooks[0]["webhooks"]
    assert [h["name"] for h in kept] == ["mpod.kb.io", "mclusterqueue.kb.io"]
    assert kept[0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate--v1-pod",
        "caBundle": "Q0E=",
    }
    # Only pods that ask for a queue go through Kueue: the rest of the cluster does not
    # depend on it being up.
    assert kept[0]["objectSelector"] == {
        "matchExpressions": [{"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]
    }
    assert "objectSelector" not in kept[1]


def test_webhooks_without_a_pod_webhook_are_an_error() -> None:
    with pytest.raises(DevClusterError, match="no pod webhook"):
        kueue.webhooks(MANIFESTS.split("---\n")[2], url="https://127.0.0.1:1", ca_bundle="")


def test_the_queue_uses_the_operators_levels_and_the_clusters_capacity() -> None:
    topology = Topology.parse("generic")
    objects = kueue.tas_objects(
        [level.label for level in topology.levels],
        {"nvidia.com/gpu.present": "true"},
        {"nvidia.com/gpu": "8000"},
    )
    by_kind = {o["kind"]: o for o in objects}
    assert [lv["nodeLabel"] for lv in by_kind["Topology"]["spec"]["levels"]] == [
        "topology.kubernetes.io/zone",
        "phalanx.dev/block",
        "phalanx.dev/rack",
        "kubernetes.io/hostname",
    ]
    flavor = by_kind["ResourceFlavor"]
    assert flavor["spec"]["topologyName"] == by_kind["Topology"]["metadata"]["name"]
    group = by_kind["ClusterQueue"]["spec"]["resourceGroups"][0]
    assert group["coveredResources"] == ["nvidia.com/gpu"]
    assert group["flavors"][0] == {
        "name": flavor["metadata"]["name"],
        "resources": [{"name": "nvidia.com/gpu", "nominalQuota": "8000"}],
    }
    queue = kueue.local_queue("team-a")
    assert queue["metadata"] == {"name": "phalanx", "namespace": "team-a"}
    assert queue["spec"]["clusterQueue"] == by_kind["ClusterQueue"]["metadata"]["name"]


def test_the_manager_serves_on_loopback_without_its_own_certificates(tmp_path: Path) -> None:
    settings = kueue.configuration(
        webhook_port=9443, health_port=8081, metrics_port=8443, cert_dir=tmp_path
    )
    assert settings["webhook"] == {"port": 9443, "host": "127.0.0.1", "certDir": str(tmp_path)}
    assert settings["internalCertManagement"] == {"enable": False}
    assert settings["integrations"] == {"frameworks": ["pod"]}
    assert settings["health"]["healthProbeBindAddress"] == "127.0.0.1:8081"


def test_module_dir_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DevClusterError, match="module cache"):
        kueue.module_dir(str(tmp_path), "v0.17.0")
