"""Pure parts of real nodes: rendered configuration, volumes, relay routes, image stamps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from phalanx.devcluster import images, netns, profiles, provisioner, realnode, relay
from phalanx.devcluster.cluster import real_node_labels, render_corefile

ROOT = Path(__file__).resolve().parents[2]


def node(index: int = 1) -> realnode.RealNode:
    return realnode.RealNode(
        Path("/state/e2e"), index, f"real-{index}", (("phalanx.dev/rack", "r0"),)
    )


def test_each_node_has_its_own_address_pod_subnet_bridge_and_cgroup_root() -> None:
    first, second = node(1), node(2)
    assert (first.ip, first.pod_subnet, first.bridge) == ("10.88.0.11", "10.244.1.0/24", "phxcni1")
    assert (second.ip, second.pod_subnet, second.bridge) == (
        "10.88.0.12",
        "10.244.2.0/24",
        "phxcni2",
    )
    assert first.cgroup_path == f"/{netns.namespace_name(Path('/state/e2e'))}/real-1"
    assert first.cgroup_path != realnode.RealNode(Path("/other"), 1, "real-1").cgroup_path


def test_kubelet_never_writes_kernel_settings_and_trusts_the_api_server() -> None:
    config = realnode.render_kubelet_config(node(), Path("/pki/ca.crt"), Path("/state/resolv.conf"))
    assert config["protectKernelDefaults"] is True
    assert config["authentication"]["anonymous"] == {"enabled": False}
    assert config["authentication"]["x509"] == {"clientCAFile": "/pki/ca.crt"}
    assert config["authorization"] == {"mode": "Webhook"}
    assert config["clusterDNS"] == [netns.DNS_IP]
    assert config["cgroupRoot"] == node().cgroup_path
    assert set(realnode.KUBELET_SYSCTLS) == {
        "vm.overcommit_memory",
        "vm.panic_on_oom",
        "kernel.panic",
        "kernel.panic_on_oops",
        "kernel.keys.root_maxkeys",
        "kernel.keys.root_maxbytes",
    }


def test_kubelet_labels_carry_topology_and_mark_the_node_real() -> None:
    args = realnode.kubelet_args(node(), Path("/k"))
    assert "--node-labels=phalanx.dev/rack=r0,phalanx.dev/real-node=true" in args
    assert "--hostname-override=real-1" in args
    assert "--node-ip=10.88.0.11" in args


def test_containerd_keeps_images_in_the_shared_store_and_state_in_the_node() -> None:
    text = realnode.render_containerd_config(
        node(), "/usr/sbin/runc", "/usr/lib/cni", "localhost/p:1"
    )
    assert f'root = "{node().store}"' in text
    assert f'state = "{node().dir}/containerd-state"' in text
    assert 'pinned_images = {sandbox = "localhost/p:1"}' in text
    assert 'BinaryName = "/usr/sbin/runc"' in text


def test_cni_bridge_per_node_with_its_own_subnet() -> None:
    config = realnode.render_cni_config(node(2))
    bridge = config["plugins"][0]
    assert bridge["bridge"] == "phxcni2"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24"}]]


def test_real_nodes_get_their_own_racks_with_the_profile_labels() -> None:
    gpu = profiles.get_profile("gpu")
    labels = [dict(real_node_labels(gpu, i, 2)) for i in range(2)]
    assert all(label["phalanx.dev/profile"] == "gpu" for label in labels)
    assert all(label["phalanx.dev/rack"].startswith("real-") for label in labels)
    for label in labels:
        for rack_label in gpu.rack_labels:
            assert label[rack_label] == label["phalanx.dev/rack"]
    assert "kubernetes.io/hostname" not in labels[0]


def test_corefile_serves_the_cluster_domain_only() -> None:
    text = render_corefile(Path("/state/kubeconfig"))
    assert f"bind {netns.DNS_IP}" in text
    assert "kubeconfig /state/kubeconfig phalanx-dev" in text
    assert "rcode NXDOMAIN" in text
    assert "forward" not in text


def claim(**spec: object) -> dict[str, object]:
    return {
        "metadata": {"name": "ckpt", "namespace": "team", "uid": "1234-abcd"},
        "spec": {
            "storageClassName": provisioner.STORAGE_CLASS,
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "200Gi"}},
            **spec,
        },
        "status": {"phase": "Pending"},
    }


def test_a_claim_gets_a_volume_of_exactly_its_size_and_modes() -> None:
    volume = provisioner.render_volume(claim(), Path("/state/volumes"))
    assert volume == {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": "pvc-1234-abcd",
            "annotations": {provisioner.PROVISIONED_BY: provisioner.PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": "200Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "standard",
            "volumeMode": "Filesystem",
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": "team",
                "name": "ckpt",
                "uid": "1234-abcd",
            },
            "hostPath": {"path": "/state/volumes/pvc-1234-abcd", "type": "DirectoryOrCreate"},
        },
    }


@pytest.mark.parametrize(
    ("spec", "wanted"),
    [
        pytest.param({}, True, id="pending-default-class"),
        pytest.param({"storageClassName": "shared-nfs"}, True, id="pending-examples-class"),
        pytest.param({"storageClassName": "fast"}, False, id="other-class"),
        pytest.param({"volumeName": "pv-1"}, False, id="already-bound"),
    ],
)
def test_only_unbound_claims_of_our_class_are_provisioned(
    spec: dict[str, object], wanted: bool
) -> None:
    assert provisioner.wants_volume(claim(**spec)) is wanted


def test_the_default_storage_class_is_ours() -> None:
    cls = provisioner.render_storage_class()
    assert cls["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert cls["provisioner"] == provisioner.PROVISIONER
    nfs = provisioner.render_storage_class("shared-nfs")
    assert nfs["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "false"


def test_every_storage_class_an_example_names_is_served() -> None:
    named = {
        doc["spec"]["checkpoint"]["storageClassName"]
        for path in sorted((ROOT / "jobs").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and (doc.get("spec", {}).get("checkpoint") or {}).get("storageClassName")
    }
    assert named
    assert named <= set(provisioner.STORAGE_CLASSES)


def test_a_volume_has_its_claim_s_class() -> None:
    volume = provisioner.render_volume(claim(storageClassName="shared-nfs"), Path("/v"))
    assert volume["spec"]["storageClassName"] == "shared-nfs"


@pytest.mark.parametrize(
    ("route", "parsed"),
    [
        ("127.0.0.1:6443", (("127.0.0.1", 6443), ("127.0.0.1", 6443))),
        ("127.0.0.1:9090=10.88.0.53:9090", (("127.0.0.1", 9090), ("10.88.0.53", 9090))),
    ],
)
def test_relay_routes(route: str, parsed: tuple[tuple[str, int], tuple[str, int]]) -> None:
    assert relay.parse_route(route) == parsed


def test_namespace_names_are_short_stable_and_per_directory() -> None:
    name = netns.namespace_name(Path("/state/a"))
    assert name == netns.namespace_name(Path("/state/a"))
    assert name != netns.namespace_name(Path("/state/b"))
    assert len(name) <= 16


def test_image_stamp_changes_with_sources_only(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "src" / "__pycache__").mkdir()
    first = images.tree_hash(tmp_path, ["src"], "base-1")
    (tmp_path / "src" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert images.tree_hash(tmp_path, ["src"], "base-1") == first
    assert images.tree_hash(tmp_path, ["src"], "base-2") != first
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert images.tree_hash(tmp_path, ["src"], "base-1") != first


@pytest.mark.parametrize(
    ("reference", "stored"),
    [
        ("localhost/phalanx-pause:dev", "localhost/phalanx-pause:dev"),
        ("ghcr.io/phalanx-dev/trainer:0.1.0", "ghcr.io/phalanx-dev/trainer:0.1.0"),
        ("python:3.11", "docker.io/library/python:3.11"),
        ("team/app:1", "docker.io/team/app:1"),
    ],
)
def test_containerd_names_images_fully(reference: str, stored: str) -> None:
    assert images._normalise(reference) == stored


def test_containerd_listing_gives_names_manifests_and_build_stamps() -> None:
    listing = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
        "ghcr.io/phalanx-dev/trainer:0.1.0 application/vnd.oci.image.manifest.v1+json "
        f"sha256:aaa 5.9GiB linux/amd64 io.cri-containerd.image=managed,{images.STAMP_LABEL}=id-1\n"
        "sha256:cfg application/vnd.oci.image.manifest.v1+json sha256:aaa 5.9GiB linux/amd64 "
        "io.cri-containerd.image=managed\n"
        "localhost/phalanx-pause:dev application/vnd.oci.image.manifest.v1+json sha256:bbb "
        "653KiB linux/amd64 -\n"
    )
    stored = images.parse_image_listing(listing)
    assert [(i.name, i.digest) for i in stored] == [
        ("ghcr.io/phalanx-dev/trainer:0.1.0", "sha256:aaa"),
        ("sha256:cfg", "sha256:aaa"),
        ("localhost/phalanx-pause:dev", "sha256:bbb"),
    ]
    assert stored[0].labels[images.STAMP_LABEL] == "id-1"
    assert stored[2].labels == {}
