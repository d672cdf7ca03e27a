"""Pinned upstream releases of every binary the dev cluster runs."""

from __future__ import annotations

from dataclasses import dataclass

KUBERNETES_VERSION = "v1.36.3"
# Staging modules (k8s.io/api, k8s.io/client-go, ...) are published as v0.<minor>.<patch>.
STAGING_VERSION = "v0.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
MINIMUM_GO = (1, 26)


@dataclass(frozen=True)
class GoBinary:
    """One binary: the Go package that builds it and the release it is pinned to."""

    name: str
    package: str
    version: str


KUBERNETES_BINARIES = tuple(
    GoBinary(name, f"k8s.io/kubernetes/cmd/{name}", KUBERNETES_VERSION)
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
)
# Since etcd 3.5 the server module's root package is the etcd main.
ETCD_BINARY = GoBinary("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION)
KWOK_BINARY = GoBinary("kwok", "sigs.k8s.io/kwok/cmd/kwok", KWOK_VERSION)
ALL_BINARIES = (*KUBERNETES_BINARIES, ETCD_BINARY, KWOK_BINARY)
