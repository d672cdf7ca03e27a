"""Dynamic volumes for the dev cluster, as kind's local-path provisioner gives them.

`python -m phalanx.devcluster.provisioner STATE_DIR` runs beside the control plane. Every
claim of its StorageClasses (provisioner `phalanx.dev/local-path`: the default `standard`, and
`shared-nfs`, the ReadWriteMany class the examples name, as a cluster's NFS class would serve
it) gets a PersistentVolume of exactly its requested size and access modes, backed by a
directory under `STATE_DIR/volumes`; the PV controller binds them. All nodes, fake or real, are on this one
machine, so a host directory serves ReadWriteMany claims across real nodes for real. When a
claim is deleted, its volume is released, and the directory and the PV are removed.

The provisioning decision is the pure `render_volume`; the loop around it only lists, creates
and deletes.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from phalanx.devcluster.apiclient import ApiClient

STORAGE_CLASS = "standard"  # the default class
# Classes the examples under jobs/ name, served alike so that they run here as written.
STORAGE_CLASSES = (STORAGE_CLASS, "shared-nfs")
PROVISIONER = "phalanx.dev/local-path"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
POLL_SECONDS = 0.5


def render_storage_class(name: str = STORAGE_CLASS) -> dict[str, Any]:
    default = "true" if name == STORAGE_CLASS else "false"
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": name,
            "annotations": {"storageclass.kubernetes.io/is-default-class": default},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": False,
    }


def wants_volume(claim: dict[str, Any]) -> bool:
    spec = claim.get("spec") or {}
    return (
        spec.get("storageClassName") in STORAGE_CLASSES
        and not spec.get("volumeName")
        and (claim.get("status") or {}).get("phase", "Pending") == "Pending"
        and not claim["metadata"].get("deletionTimestamp")
    )


def volume_name(claim: dict[str, Any]) -> str:
    return f"pvc-{claim['metadata']['uid']}"


def render_volume(claim: dict[str, Any], volumes_dir: Path) -> dict[str, Any]:
    """The PersistentVolume that satisfies a claim: its size, its modes, a fresh directory."""
    meta, spec = claim["metadata"], claim["spec"]
    name = volume_name(claim)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec["storageClassName"],
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "hostPath": {"path": str(volumes_dir / name), "type": "DirectoryOrCreate"},
        },
    }


def released(volume: dict[str, Any]) -> bool:
    return (volume["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER and (
        volume.get("status") or {}
    ).get("phase") in ("Released", "Failed")


class Provisioner:
    def __init__(self, client: ApiClient, volumes_dir: Path) -> None:
        self.client = client
        self.volumes_dir = volumes_dir

    def ensure_storage_classes(self) -> None:
        for name in STORAGE_CLASSES:
            reply = self.client.post(
                "/apis/storage.k8s.io/v1/storageclasses", render_storage_class(name)
            )
            if reply.status not in (201, 409):
                raise RuntimeError(f"creating StorageClass {name}: HTTP {reply.status}")

    def pass_once(self) -> None:
        claims = self.client.get("/api/v1/persistentvolumeclaims").json()["items"]
        for claim in claims:
            if wants_volume(claim):
                volume = render_volume(claim, self.volumes_dir)
                path = Path(volume["spec"]["hostPath"]["path"])
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)  # workloads run as non-root users of their own choosing
                self.client.post("/api/v1/persistentvolumes", volume)  # 409: made last pass
        for volume in self.client.get("/api/v1/persistentvolumes").json()["items"]:
            if released(volume):
                shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
                self.client.request(
                    "DELETE", f"/api/v1/persistentvolumes/{volume['metadata']['name']}"
                )


def main(argv: list[str]) -> None:
    from phalanx.devcluster.cluster import DevCluster

    cluster = DevCluster(Path(argv[0]))
    provisioner = Provisioner(cluster.client(), cluster.root / "volumes")
    running = True

    def stop(_signum: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running:
        try:
            provisioner.ensure_storage_classes()
            break
        except OSError:
            time.sleep(POLL_SECONDS)
    while running:
        try:
            provisioner.pass_once()
        except (OSError, ValueError, KeyError) as error:
            print(f"provisioner pass failed: {error}", file=sys.stderr, flush=True)
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main(sys.argv[1:])
