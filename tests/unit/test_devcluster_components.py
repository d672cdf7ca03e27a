from __future__ import annotations

import socket
from pathlib import Path

import pytest

from phalanx.devcluster import components
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.layout import ClusterLayout, Ports
from phalanx.devcluster.ports import choose_ports, free_ports

PORTS = Ports(
    apiserver=6443,
    etcd_client=2379,
    etcd_peer=2380,
    controller_manager=10257,
    scheduler=10259,
    kwok=10247,
)


def plan(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    layout = ClusterLayout(tmp_path)
    return {c.name: c.argv for c in components.control_plane(layout, PORTS, Path("/bin-dir"))}


def test_components_start_in_dependency_order(tmp_path: Path) -> None:
    assert list(plan(tmp_path)) == [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ]


def test_every_component_listens_on_loopback_only(tmp_path: Path) -> None:
    argv = plan(tmp_path)

    assert "--bind-address=127.0.0.1" in argv["kube-apiserver"]
    assert "--listen-client-urls=https://127.0.0.1:2379" in argv["etcd"]
    assert "--server-address=127.0.0.1:10247" in argv["kwok"]


def test_apiserver_talks_to_etcd_with_client_certificates(tmp_path: Path) -> None:
    apiserver = plan(tmp_path)["kube-apiserver"]

    assert "--etcd-servers=https://127.0.0.1:2379" in apiserver
    assert any(a.startswith("--etcd-certfile=") for a in apiserver)


def test_controller_manager_runs_every_default_controller_with_sa_credentials(
    tmp_path: Path,
) -> None:
    manager = plan(tmp_path)["kube-controller-manager"]

    assert "--controllers=*" in manager
    assert "--use-service-account-credentials=true" in manager
    assert any(a.startswith("--service-account-private-key-file=") for a in manager)


def test_kwok_manages_only_annotated_nodes(tmp_path: Path) -> None:
    kwok = plan(tmp_path)["kwok"]

    assert "--manage-all-nodes=false" in kwok
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in kwok


def test_ports_are_distinct() -> None:
    chosen = choose_ports()

    values = list(vars(chosen).values())
    assert len(set(values)) == len(values)


def test_taken_port_is_one_line_with_the_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_ports(1)[0]))
        sock.listen()
        taken = sock.getsockname()[1]
        with pytest.raises(
            DevClusterError, match=f"port {taken} .* already in use: pass another --port"
        ):
            choose_ports(taken)
