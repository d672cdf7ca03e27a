"""Command lines of the control-plane processes, as pure functions of the cluster layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phalanx.devcluster.certs import FRONT_PROXY_CA, FRONT_PROXY_CLIENT
from phalanx.devcluster.layout import ClusterLayout, Ports

SERVICE_CIDR = "10.96.0.0/16"
# Pod and node addresses live in the loopback range: anything that dials a fake pod (the
# operator's progress poller, a test) stays on this machine.
POD_CIDR = "127.244.0.0/16"
# In a cluster with real nodes (its own network namespace) fake pods get addresses that are
# valid endpoints, routed to the namespace's loopback.
NETNS_POD_CIDR = "10.245.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Without kubelet leases every node heartbeat is a status write; the stages send one every
# 40-55 s, so two minutes of grace keep nodes Ready while still noticing a stopped kwok.
NODE_MONITOR_GRACE_PERIOD = "120s"


@dataclass(frozen=True)
class Component:
    """One process of the control plane, in start order."""

    name: str
    argv: tuple[str, ...]
    # HTTPS path probed for health; None when the process has no probe we can reach.
    health_url: str | None


def control_plane(
    layout: ClusterLayout, ports: Ports, bin_dir: Path, *, in_namespace: bool = False
) -> tuple[Component, ...]:
    return (
        etcd(layout, ports, bin_dir),
        kube_apiserver(layout, ports, bin_dir),
        kube_controller_manager(layout, ports, bin_dir),
        kube_scheduler(layout, ports, bin_dir),
        kwok(layout, ports, bin_dir, pod_cidr=NETNS_POD_CIDR if in_namespace else POD_CIDR),
    )


def etcd(layout: ClusterLayout, ports: Ports, bin_dir: Path) -> Component:
    pki = layout.pki
    client_url = f"https://127.0.0.1:{ports.etcd_client}"
    peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
    argv = (
        str(bin_dir / "etcd"),
        "--name=phalanx-dev",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=phalanx-dev={peer_url}",
        f"--cert-file={pki.cert('etcd-server')}",
        f"--key-file={pki.key('etcd-server')}",
        f"--trusted-ca-file={pki.ca_cert}",
        "--client-cert-auth=true",
        # A throwaway cluster trades durability for speed.
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    )
    return Component("etcd", argv, None)


def kube_apiserver(layout: ClusterLayout, ports: Ports, bin_dir: Path) -> Component:
    pki = layout.pki
    argv = (
        str(bin_dir / "kube-apiserver"),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        # Nothing runs in pods, and a loopback address is not a valid endpoint of the
        # `kubernetes` Service: leave that Service without endpoints.
        "--endpoint-reconciler-type=none",
        f"--secure-port={ports.apiserver}",
        f"--etcd-servers=https://127.0.0.1:{ports.etcd_client}",
        f"--etcd-cafile={pki.ca_cert}",
        f"--etcd-certfile={pki.cert('apiserver-etcd-client')}",
        f"--etcd-keyfile={pki.key('apiserver-etcd-client')}",
        f"--tls-cert-file={pki.cert('apiserver')}",
        f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_cert}",
        # Request-header authentication for aggregated API servers (metrics-server and co.).
        f"--requestheader-client-ca-file={pki.cert(FRONT_PROXY_CA)}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.cert(FRONT_PROXY_CLIENT)}",
        f"--proxy-client-key-file={pki.key(FRONT_PROXY_CLIENT)}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Real kubelets are authorised as nodes (their own pods, secrets and volumes only).
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
        # Node host names resolve nowhere; the InternalIP is on the cluster bridge.
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--allow-privileged=true",
        "--profiling=false",
        "--event-ttl=1h",
    )
    return Component("kube-apiserver", argv, f"https://127.0.0.1:{ports.apiserver}/readyz")


def kube_controller_manager(layout: ClusterLayout, ports: Ports, bin_dir: Path) -> Component:
    pki = layout.pki
    kubeconfig = layout.component_kubeconfig("controller-manager")
    argv = (
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        # Default-on controllers: garbage collector, deployment/replicaset, endpoints and
        # endpointslice, namespace, node lifecycle, service account and token, job, ...
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca_cert}",
        f"--cluster-signing-cert-file={pki.ca_cert}",
        f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--cluster-cidr={POD_CIDR}",
        "--allocate-node-cidrs=false",
        f"--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD}",
        # One instance per cluster: skip the lease round trip on start.
        "--leader-elect=false",
        "--profiling=false",
    )
    return Component(
        "kube-controller-manager", argv, f"https://127.0.0.1:{ports.controller_manager}/healthz"
    )


def kube_scheduler(layout: ClusterLayout, ports: Ports, bin_dir: Path) -> Component:
    kubeconfig = layout.component_kubeconfig("scheduler")
    argv = (
        str(bin_dir / "kube-scheduler"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.scheduler}",
        "--leader-elect=false",
        "--profiling=false",
    )
    return Component("kube-scheduler", argv, f"https://127.0.0.1:{ports.scheduler}/healthz")


def kwok(
    layout: ClusterLayout, ports: Ports, bin_dir: Path, *, pod_cidr: str = POD_CIDR
) -> Component:
    argv = (
        str(bin_dir / "kwok"),
        f"--kubeconfig={layout.component_kubeconfig('kwok')}",
        f"--config={layout.kwok_config}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--server-address=127.0.0.1:{ports.kwok}",
        f"--cidr={pod_cidr}",
        "--node-ip=127.0.0.1",
    )
    return Component("kwok", argv, f"http://127.0.0.1:{ports.kwok}/healthz")
