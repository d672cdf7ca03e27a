"""The files of one dev cluster inside its state directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from phalanx.devcluster.certs import Pki
from phalanx.devcluster.errors import DevClusterError


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one cluster; every one is chosen per cluster so clusters coexist."""

    apiserver: int
    etcd_client: int
    etcd_peer: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class ClusterLayout:
    root: Path

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "pki")

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def kwok_config(self) -> Path:
        return self.root / "kwok.yaml"

    @property
    def cluster_file(self) -> Path:
        """Ports and profile of the running cluster, written by `up`."""
        return self.root / "cluster.json"

    def component_kubeconfig(self, component: str) -> Path:
        return self.root / "kubeconfigs" / f"{component}.kubeconfig"

    def log(self, component: str) -> Path:
        return self.root / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.root / "run" / f"{component}.pid"

    def write_ports(self, ports: Ports, **extra: object) -> None:
        self.cluster_file.write_text(json.dumps({"ports": asdict(ports), **extra}, indent=2) + "\n")

    def read_ports(self) -> Ports:
        try:
            data = json.loads(self.cluster_file.read_text())
            return Ports(**data["ports"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DevClusterError(
                f"no dev cluster in {self.root} ({error.__class__.__name__}): run `phalanx dev up`"
            ) from None
