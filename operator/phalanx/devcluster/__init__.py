"""Local Kubernetes control plane for tests and demos.

Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok from
the Go module proxy, runs them on loopback, and fills the cluster with fake accelerator
nodes whose pods are driven by kwok stages.
"""

from __future__ import annotations

from phalanx.devcluster.errors import DevClusterError

__all__ = ["DevClusterError"]
