"""Pinned upstream releases of every binary the dev cluster runs."""

from __future__ import annotations

from dataclasses import dataclass

KUBERNETES_VERSION = "v1.36.3"
# Staging modules (k8s.io/api, k8s.io/client-go, ...) are published as v0.<minor>.<patch>.
STAGING_VERSION = "v0.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
# Real nodes: containerd 2.x speaks the CRI RuntimeConfig call kubelet 1.36 asks for (1.6 is EOL).
CONTAINERD_VERSION = "v2.4.2"
COREDNS_VERSION = "v1.15.0"
MINIMUM_GO = (1, 26)
# Helm for the chart's lint, render, install and upgrade tests (not part of the cluster).
HELM_VERSION = "v3.22.0"
# The Kubernetes minor of the client-go that HELM_VERSION requires (v0.37): helm's default
# capabilities (`helm template` without a cluster) report it, as helm's own release build does.
HELM_KUBE_MINOR = "37"
# Prometheus for scraping dev-cluster pods with kubernetes_sd (Debian's package is built
# without it). Its Go module is versioned v0.<major><minor>.<patch>: v0.316.0 is 3.16.0.
PROMETHEUS_VERSION = "v0.316.0"
PROMETHEUS_RELEASE = "3.16.0"
# Kueue, the peer the scale benchmark measures `gangScheduler: kueue` against (TAS on).
KUEUE_VERSION = "v0.17.0"


@dataclass(frozen=True)
class GoBinary:
    """One binary: the Go package that builds it and the release it is pinned to."""

    name: str
    package: str
    version: str
    tags: tuple[str, ...] = ()


KUBERNETES_BINARIES = tuple(
    GoBinary(name, f"k8s.io/kubernetes/cmd/{name}", KUBERNETES_VERSION)
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
)
# The kubelet of real nodes, at the control plane's own version (no skew to reason about).
KUBELET_BINARY = GoBinary("kubelet", "k8s.io/kubernetes/cmd/kubelet", KUBERNETES_VERSION)
# Since etcd 3.5 the server module's root package is the etcd main.
ETCD_BINARY = GoBinary("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION)
KWOK_BINARY = GoBinary("kwok", "sigs.k8s.io/kwok/cmd/kwok", KWOK_VERSION)
# Storage drivers that need cgo or kernel features the dev nodes never use.
_CONTAINERD_TAGS = ("no_btrfs", "no_devmapper", "no_zfs", "no_aufs")
CONTAINERD_BINARIES = tuple(
    GoBinary(
        name,
        f"github.com/containerd/containerd/v2/cmd/{name}",
        CONTAINERD_VERSION,
        _CONTAINERD_TAGS,
    )
    for name in ("containerd", "containerd-shim-runc-v2", "ctr")
)
COREDNS_BINARY = GoBinary("coredns", "github.com/coredns/coredns", COREDNS_VERSION)
HELM_BINARY = GoBinary("helm", "helm.sh/helm/v3/cmd/helm", HELM_VERSION)
PROMETHEUS_BINARY = GoBinary(
    "prometheus", "github.com/prometheus/prometheus/cmd/prometheus", PROMETHEUS_VERSION
)
KUEUE_BINARY = GoBinary("kueue", "sigs.k8s.io/kueue/cmd/kueue", KUEUE_VERSION)
CONTROL_PLANE_BINARIES = (*KUBERNETES_BINARIES, ETCD_BINARY, KWOK_BINARY)
NODE_BINARIES = (KUBELET_BINARY, *CONTAINERD_BINARIES, COREDNS_BINARY)
ALL_BINARIES = (*CONTROL_PLANE_BINARIES, *NODE_BINARIES)
