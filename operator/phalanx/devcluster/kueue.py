"""Kueue beside the dev cluster: the peer `gangScheduler: kueue` hands gangs to.

The manager is Kueue built from the Go module proxy (`build.ensure_kueue`); its CRDs and
webhook definitions come from the same module's source (`config/components`), as a release
install would apply them. Differences from an in-cluster install, all because the manager
runs as a process next to the API server rather than behind a Service:
- its webhooks are called by URL on loopback (inside the cluster's network namespace), with a
  serving certificate from the cluster's CA instead of Kueue's internal certificate rotation;
- only the pod integration is on (Phalanx creates pods; no other workload CRDs exist here),
  and the pod webhook only sees pods that carry a queue name, so the rest of the cluster does
  not depend on Kueue being up;
- leader election and the on-demand visibility API server are off (one manager, no
  aggregation layer);
- its metrics certificate, read from a fixed path under /etc, is overlaid there in a mount
  namespace of the manager's own (`mountns.py`), so the machine's /etc is not written.

Topology-aware scheduling uses the operator's topology: one Kueue `Topology` with the same
levels and labels, one `ResourceFlavor` for the profile's nodes, one `ClusterQueue` whose
quota is the cluster's capacity (admission is then limited by topology, as ours is) and one
`LocalQueue` per namespace. Pure functions; the shell is `DevCluster.start_kueue`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from phalanx.devcluster.errors import DevClusterError

API = "kueue.x-k8s.io/v1beta2"
TOPOLOGY = "phalanx"
FLAVOR = "phalanx-nodes"
CLUSTER_QUEUE = "phalanx"
LOCAL_QUEUE = "phalanx"
# The webhooks Kueue registers for what exists here: pods, and its own kinds.
KEPT_WEBHOOK_PATHS = ("-v1-pod", "-kueue-x-k8s-io-")
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
# Marks what the dev cluster installed for Kueue, so that stopping it removes exactly that.
PEER_LABEL = "phalanx.dev/peer"
PEER_SELECTOR = f"{PEER_LABEL}=kueue"
# Where the manager loads its metrics serving certificate from when it does not manage
# certificates itself (fixed in its main package, not configurable).
METRICS_CERTS = Path("/etc/kueue/metrics/certs")


def module_dir(gomodcache: str, version: str) -> Path:
    """Where `go install sigs.k8s.io/kueue/cmd/kueue@version` left the module's source."""
    path = Path(gomodcache) / "sigs.k8s.io" / f"kueue@{version}"
    if not (path / "config" / "components").is_dir():
        raise DevClusterError(f"Kueue's source is not in the module cache at {path}")
    return path


def crd_files(source: Path) -> list[Path]:
    return sorted((source / "config" / "components" / "crd" / "bases").glob("*.yaml"))


def configuration(
    *, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path
) -> dict[str, Any]:
    """Kueue's manager configuration for a manager on loopback."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        # As Kueue's own default; the scale benchmark compares admission, not client limits.
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["pod"]},
    }


def webhooks(manifests: str, *, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, kept to pods and Kueue's own kinds, called at `url`.
    The pod webhook sees only pods with a queue name (`objectSelector`)."""
    documents = [d for d in yaml.safe_load_all(manifests) if d]
    kept = []
    for document in documents:
        document = copy.deepcopy(document)
        hooks = []
        for hook in document.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if not any(part in path for part in KEPT_WEBHOOK_PATHS):
                continue
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": ca_bundle}
            if path.endswith("-v1-pod"):
                hook["objectSelector"] = {
                    "matchExpressions": [{"key": QUEUE_NAME_LABEL, "operator": "Exists"}]
                }
            hooks.append(hook)
        if hooks:
            document["webhooks"] = hooks
            document["metadata"] = {
                "name": f"kueue-{document['metadata']['name']}",
                "labels": {PEER_LABEL: "kueue"},
            }
            kept.append(document)
    if not kept:
        raise DevClusterError("Kueue's webhook manifests name no pod webhook")
    return kept


def tas_objects(
    levels: list[str], node_labels: Mapping[str, str], quota: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The Topology (node labels coarsest first), a ResourceFlavor of the nodes that carry
    `node_labels`, and a ClusterQueue whose nominal quota is `quota`."""
    return [
        {
            "apiVersion": API,
            "kind": "Topology",
            "metadata": {"name": TOPOLOGY},
            "spec": {"levels": [{"nodeLabel": label} for label in levels]},
        },
        {
            "apiVersion": API,
            "kind": "ResourceFlavor",
            "metadata": {"name": FLAVOR},
            "spec": {"nodeLabels": dict(node_labels), "topologyName": TOPOLOGY},
        },
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": CLUSTER_QUEUE},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": sorted(quota),
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": name, "nominalQuota": value}
                                    for name, value in sorted(quota.items())
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    ]


def local_queue(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": {"name": LOCAL_QUEUE, "namespace": namespace},
        "spec": {"clusterQueue": CLUSTER_QUEUE},
    }
