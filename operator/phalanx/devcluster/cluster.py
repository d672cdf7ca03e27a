"""Bring a dev cluster up, report on it, and take it down again.

`DevCluster(dir).up()` starts etcd and kube-apiserver, waits for /readyz, starts
kube-controller-manager, kube-scheduler and kwok, creates the profile's fake nodes and waits
until they are Ready. Each `up` starts from an empty etcd: a dev cluster is disposable.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from phalanx.devcluster import components as components_
from phalanx.devcluster import (
    kueue,
    kwok_stages,
    mountns,
    netns,
    paths,
    profiles,
    prometheus,
    realnode,
)
from phalanx.devcluster.apiclient import ApiClient, probe
from phalanx.devcluster.build import ensure_kueue, ensure_prometheus, go_env, require_binaries
from phalanx.devcluster.certs import CLIENTS, ClientIdentity, ensure_pki, issue_client, issue_server
from phalanx.devcluster.components import Component
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.kubeconfig import render_kubeconfig, write_kubeconfig
from phalanx.devcluster.layout import ClusterLayout, Ports
from phalanx.devcluster.ports import choose_ports, free_ports
from phalanx.devcluster.processes import (
    ProcessState,
    process_state,
    read_pid_file,
    resident_bytes,
    start_process,
    stop_process,
)
from phalanx.devcluster.versions import KUEUE_VERSION

Progress = Callable[[str], None]
COMPONENT_NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Processes beside the control plane: dynamic volumes always; the relay into the cluster's
# network namespace when it has one; cluster DNS only with real nodes.
ADDON_NAMES = ("provisioner", "relay", "coredns")
# Started on request (`start_operator`), stopped first by `down`: a client, before its cluster.
OPERATOR = "operator"
OPERATOR_PORTS = {"PHALANX_METRICS_PORT": "18080"}
# Started on request (`start_prometheus`), stopped by `down` before the cluster.
PROMETHEUS = "prometheus"
PROMETHEUS_RELAY = "prometheus-relay"
KUEUE = "kueue"
REAL_NODE_PREFIX = "real"
ACCELERATOR_RESOURCES = ("nvidia.com/gpu", "huawei.com/Ascend910")
NODE_CREATE_WORKERS = 8


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: ProcessState
    pid: int | None
    log: Path
    rss_bytes: int


@dataclass(frozen=True)
class NodeSummary:
    total: int
    ready: int
    accelerators: dict[str, int]


@dataclass(frozen=True)
class ClusterStatus:
    root: Path
    kubeconfig: Path
    components: tuple[ComponentStatus, ...]
    nodes: NodeSummary | None

    @property
    def running(self) -> bool:
        return all(c.state is ProcessState.RUNNING for c in self.components)

    @property
    def rss_bytes(self) -> int:
        return sum(c.rss_bytes for c in self.components)


class DevCluster:
    """One local control plane whose files live in `root`."""

    def __init__(self, root: Path | str | None = None, *, name: str = "default") -> None:
        self.layout = ClusterLayout(
            Path(root) if root is not None else paths.default_state_dir(name)
        )

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    def up(
        self,
        *,
        profile: str = "gpu",
        nodes: int | None = None,
        port: int | None = None,
        real: int = 0,
        timeout: float = 120.0,
        progress: Progress | None = None,
    ) -> Path:
        """Start the control plane, its fake nodes and `real` kubelet nodes.

        Where the machine allows it (always with real nodes), everything runs in the cluster's
        own network namespace and a relay publishes the API server on the machine's 127.0.0.1
        at the same port.
        Returns the admin kubeconfig path.
        """
        report = progress or (lambda _line: None)
        chosen_profile = _profile_or_error(profile)
        bin_dir = require_binaries(real_nodes=real > 0)
        if self._check_not_running():
            report(f"already running in {self.root}")
            return self.kubeconfig
        if real:
            realnode.check_host()
        started = time.monotonic()
        ports = choose_ports(port)
        # Its own network namespace wherever the machine allows (real nodes need one): fake
        # pods then get addresses the EndpointSlice controller accepts, which nothing outside
        # the namespace can dial. Elsewhere, fake pods get loopback addresses instead.
        isolated = real > 0 or netns.available() is None
        namespace = netns.namespace_name(self.root) if isolated else None
        self._prepare_files(ports, chosen_profile.name, real=real, namespace=namespace)
        plan = components_.control_plane(self.layout, ports, bin_dir, in_namespace=isolated)
        try:
            if namespace is not None:
                netns.create(namespace)
                # Fake pods get addresses the EndpointSlice controller accepts; routed locally
                # in the namespace, anything there can serve and dial them.
                netns.run_in(
                    namespace,
                    ["ip", "route", "add", "local", components_.NETNS_POD_CIDR, "dev", "lo"],
                )
            self._start(plan[:2], namespace)
            if namespace is not None:
                # The API server and every health port, on the machine's loopback as without
                # real nodes (kubectl, the tests and `dev status` reach them unchanged).
                published = (ports.apiserver, ports.controller_manager, ports.scheduler, ports.kwok)
                self._start_addon(
                    "relay",
                    (
                        "-m",
                        "phalanx.devcluster.relay",
                        str(netns.namespace_path(namespace)),
                        *(f"127.0.0.1:{port}" for port in published),
                    ),
                )
            client = self.client(ports)
            self._wait_ready(plan[:2], client, deadline=started + timeout)
            report(
                f"kube-apiserver ready on https://127.0.0.1:{ports.apiserver} ({time.monotonic() - started:.1f}s)"
            )
            self._start(plan[2:], namespace)
            node_objects = profiles.render_nodes(chosen_profile, nodes)
            create_nodes(client, node_objects)
            self._start_addon(
                "provisioner", ("-m", "phalanx.devcluster.provisioner", str(self.root))
            )
            self._wait_ready(plan, client, deadline=started + timeout)
            self._wait_nodes_ready(
                client, {n["metadata"]["name"] for n in node_objects}, plan, started + timeout
            )
            report(
                f"{len(node_objects)} {chosen_profile.name} nodes Ready ({time.monotonic() - started:.1f}s)"
            )
            if namespace is not None:
                self._start_real_nodes(
                    client, namespace, bin_dir, report, deadline=time.monotonic() + timeout
                )
                report(f"{real} real nodes Ready ({time.monotonic() - started:.1f}s)")
        except BaseException:
            self.down()
            raise
        return self.kubeconfig

    def start_operator(self, env: dict[str, str] | None = None) -> Path:
        """Run `phalanx operator run` beside the cluster (in its network namespace, where the
        operator reaches pods for progress); `down` stops it. Returns its log."""
        phalanx = Path(sys.executable).with_name("phalanx")
        start_process(
            (
                sys.executable,  # the PID record names the interpreter, which is what runs
                str(phalanx),
                "operator",
                "run",
                "--metrics-port",
                OPERATOR_PORTS["PHALANX_METRICS_PORT"],
                "--liveness",
                "http://127.0.0.1:18081/healthz",
            ),
            pid_file=self.layout.pid_file(OPERATOR),
            log_file=self.layout.log(OPERATOR),
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig), **(env or {})},
            preexec=netns.enter(self.namespace()),
        )
        return self.layout.log(OPERATOR)

    def start_prometheus(self, *, interval_seconds: float = 2.0, timeout: float = 60.0) -> str:
        """Run Prometheus (the pinned build: `build.ensure_prometheus`) with the chart's workload scrape configs and the operator as a
        target (in the cluster's network namespace when it has one); `down` stops it.
        Returns its URL on the machine's loopback."""
        binary = str(ensure_prometheus())
        if process_state(self.layout.pid_file(PROMETHEUS)) is ProcessState.RUNNING:
            return self.prometheus_url()
        port = free_ports(1)[0]
        config = prometheus.render_config(
            prometheus.shipped_scrape_configs(),
            kubeconfig=self.kubeconfig,
            operator_target=f"127.0.0.1:{OPERATOR_PORTS['PHALANX_METRICS_PORT']}",
            interval_seconds=interval_seconds,
        )
        config_file = self.root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        data = self.root / "prometheus-data"
        shutil.rmtree(data, ignore_errors=True)  # a dev cluster's history starts with it
        namespace = self.namespace()
        self._start_addon(
            PROMETHEUS,
            prometheus.command(binary, config_file, data, port),
            binary=True,
            namespace=namespace,
        )
        if namespace is not None:
            self._start_addon(
                PROMETHEUS_RELAY,
                (
                    "-m",
                    "phalanx.devcluster.relay",
                    str(netns.namespace_path(namespace)),
                    f"127.0.0.1:{port}",
                ),
            )
        (self.root / "prometheus.url").write_text(f"http://127.0.0.1:{port}\n")
        url = self.prometheus_url()
        deadline = time.monotonic() + timeout
        while not _answers(f"{url}/-/ready"):
            if process_state(self.layout.pid_file(PROMETHEUS)) is not ProcessState.RUNNING:
                raise DevClusterError(f"prometheus exited (log: {self.layout.log(PROMETHEUS)})")
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"prometheus not ready in {timeout:.0f}s (log: {self.layout.log(PROMETHEUS)})"
                )
            time.sleep(0.5)
        return url

    def start_kueue(
        self,
        *,
        levels: list[str],
        node_labels: dict[str, str],
        quota: dict[str, str],
        timeout: float = 180.0,
    ) -> None:
        """Install Kueue's CRDs, run its manager (the pinned build: `build.ensure_kueue`) in the
        cluster's network namespace with webhooks on loopback, and create a topology-aware
        ClusterQueue over `levels` (node labels, coarsest first); `down` stops it. Namespaces
        get their LocalQueue from `kueue_queue`."""
        binary = str(ensure_kueue())
        source = kueue.module_dir(go_env("GOMODCACHE"), KUEUE_VERSION)
        if process_state(self.layout.pid_file(KUEUE)) is ProcessState.RUNNING:
            return
        crds = [f"-f={path}" for path in kueue.crd_files(source)]
        self.kubectl("apply", "--server-side", *crds)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds)
        webhook_port, health_port, metrics_port = free_ports(3)
        pki = self.layout.pki
        issue_server(pki, "kueue-webhook", "kueue-webhook")
        certs_dir = self.root / "kueue-certs"
        certs_dir.mkdir(exist_ok=True)
        shutil.copy(pki.cert("kueue-webhook"), certs_dir / "tls.crt")
        shutil.copy(pki.key("kueue-webhook"), certs_dir / "tls.key")
        # Its metrics server reads a fixed path: an overlay on /etc, in a mount namespace
        # of the manager's own, holds the same certificate there.
        etc = self.root / "kueue-etc"
        shutil.rmtree(etc, ignore_errors=True)
        metrics_certs = etc / "upper" / kueue.METRICS_CERTS.relative_to("/etc")
        metrics_certs.mkdir(parents=True)
        (etc / "work").mkdir()
        shutil.copytree(certs_dir, metrics_certs, dirs_exist_ok=True)
        config = kueue.configuration(
            webhook_port=webhook_port,
            health_port=health_port,
            metrics_port=metrics_port,
            cert_dir=certs_dir,
        )
        config_file = self.root / "kueue-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kueue-system"}})
        namespace = self.namespace()
        start_process(
            (
                binary,
                f"--config={config_file}",
                f"--kubeconfig={self.kubeconfig}",
                "--feature-gates=VisibilityOnDemand=false",
            ),
            pid_file=self.layout.pid_file(KUEUE),
            log_file=self.layout.log(KUEUE),
            preexec=_both(
                netns.enter(namespace),
                mountns.overlay(Path("/etc"), etc / "upper", etc / "work"),
            ),
        )
        deadline = time.monotonic() + timeout
        while True:
            with netns.entered(namespace):
                ready = _answers(f"http://127.0.0.1:{health_port}/readyz")
            if ready:
                break
            if process_state(self.layout.pid_file(KUEUE)) is not ProcessState.RUNNING:
                raise DevClusterError(f"kueue exited (log: {self.layout.log(KUEUE)})")
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"kueue not ready in {timeout:.0f}s ({self.layout.log(KUEUE)})"
                )
            time.sleep(0.5)
        ca_bundle = base64.b64encode(pki.ca_cert.read_bytes()).decode()
        manifests = (source / "config" / "components" / "webhook" / "manifests.yaml").read_text()
        for hook in kueue.webhooks(
            manifests, url=f"https://127.0.0.1:{webhook_port}", ca_bundle=ca_bundle
        ):
            self._apply(hook)
        # The webhooks of Kueue's own kinds now answer: its objects go through them.
        for obj in kueue.tas_objects(levels, node_labels, quota):
            self._apply(obj, attempts_until=deadline)

    def stop_kueue(self) -> None:
        """Remove Kueue's webhooks first (a pod that asks for a queue would otherwise be
        refused while nothing answers them), then stop its manager. Its CRDs stay."""
        self.kubectl(
            "delete",
            "mutatingwebhookconfigurations,validatingwebhookconfigurations",
            "-l",
            kueue.PEER_SELECTOR,
            "--ignore-not-found",
        )
        stop_process(self.layout.pid_file(KUEUE))

    def kueue_queue(self, namespace: str) -> str:
        """A LocalQueue in `namespace` for the ClusterQueue `start_kueue` made; its name."""
        self._apply(kueue.local_queue(namespace))
        return kueue.LOCAL_QUEUE

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        """Run the cluster's kubectl against it; its output, or the error it printed."""
        kubectl = require_binaries(real_nodes=False) / "kubectl"
        result = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(args[:2])}: {result.stderr.strip()}")
        return result.stdout

    def _apply(self, obj: dict[str, Any], *, attempts_until: float | None = None) -> None:
        """Server-side apply of one object; retried until `attempts_until` while a webhook it
        goes through is still coming up."""
        while True:
            try:
                self.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(obj))
                return
            except DevClusterError:
                if attempts_until is None or time.monotonic() > attempts_until:
                    raise
                time.sleep(1.0)

    def prometheus_url(self) -> str:
        try:
            return (self.root / "prometheus.url").read_text().strip()
        except OSError as error:
            raise DevClusterError("no Prometheus runs beside this cluster") from error

    def real_nodes(self) -> list[realnode.RealNode]:
        """The real nodes of this cluster, as recorded by `up`."""
        try:
            data = json.loads(self.layout.cluster_file.read_text())
        except (OSError, ValueError):
            return []
        return [
            realnode.RealNode(
                self.root, entry["index"], entry["name"], tuple(map(tuple, entry["labels"]))
            )
            for entry in data.get("realNodes", [])
        ]

    def namespace(self) -> str | None:
        try:
            value = json.loads(self.layout.cluster_file.read_text()).get("netns")
        except (OSError, ValueError):
            return None
        return str(value) if value else None

    def _start_real_nodes(
        self,
        client: ApiClient,
        namespace: str,
        bin_dir: Path,
        report: Progress,
        *,
        deadline: float,
    ) -> None:
        from phalanx.devcluster.images import IMAGES, PAUSE_IMAGE, ImageBuilder

        nodes = self.real_nodes()
        # Kubelets authenticate webhook-style through the API server (TokenReview/SAR).
        _ensure(
            client,
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "phalanx-dev:nodes-auth-delegator"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:auth-delegator",
                },
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Group",
                        "name": "system:nodes",
                    }
                ],
            },
        )
        resolv = self.root / "resolv.conf"
        resolv.write_text(f"nameserver {netns.DNS_IP}\nsearch cluster.local\noptions ndots:5\n")
        corefile = self.root / "Corefile"
        corefile.write_text(render_corefile(self.kubeconfig))
        self._start_addon(
            "coredns",
            (str(bin_dir / "coredns"), "-conf", str(corefile)),
            binary=True,
            namespace=namespace,
        )
        builder = ImageBuilder(progress=report)
        builder.buildah.prepare()
        builder.pause()
        references = [PAUSE_IMAGE] + [
            i.tag for i in IMAGES if builder.buildah.image_labels(i.tag) is not None
        ]
        processes = []
        for node in nodes:
            realnode.claim_store(node)
            identity = ClientIdentity(
                f"node-{node.name}", f"system:node:{node.name}", ("system:nodes",)
            )
            issue_client(self.layout.pki, identity)
            kubeconfig = self.root / "kubeconfigs" / f"{node.name}.kubeconfig"
            write_kubeconfig(
                kubeconfig,
                render_kubeconfig(
                    cluster="phalanx-dev",
                    server=f"https://127.0.0.1:{self.layout.read_ports().apiserver}",
                    ca_cert=self.layout.pki.ca_cert,
                    client_cert=self.layout.pki.cert(identity.file_stem),
                    client_key=self.layout.pki.key(identity.file_stem),
                    user=identity.user,
                ),
            )
            process = realnode.NodeProcess(node, namespace, bin_dir)
            process.configure(kubeconfig, self.layout.pki.ca_cert, resolv, PAUSE_IMAGE)
            process.start()
            processes.append(process)
        for process in processes:
            process.wait_for_containerd(deadline)
            for line in builder.load(references, bin_dir / "ctr", process.node.socket):
                report(f"loaded {line} into {process.node.name}")
            process.start_kubelet()
        names = {node.name for node in nodes}
        while True:
            items = client.get("/api/v1/nodes?labelSelector=" + realnode.REAL_NODE_LABEL).json()[
                "items"
            ]
            if names <= {n["metadata"]["name"] for n in items if node_is_schedulable(n)}:
                return
            for process in processes:
                process.raise_if_exited()
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"real nodes not Ready in time (logs in {self.root / 'nodes'})"
                )
            time.sleep(0.2)

    def down(self) -> list[str]:
        """Stop exactly the processes `up` started, real nodes first; remove the namespace.

        Returns the names that were running.
        """
        stopped = []
        for name in (OPERATOR, KUEUE, PROMETHEUS_RELAY, PROMETHEUS):
            if stop_process(self.layout.pid_file(name)):
                stopped.append(name)
        namespace = self.namespace()
        for node in self.real_nodes():
            if realnode.NodeProcess(node, namespace or "", paths.bin_dir()).stop():
                stopped.append(node.name)
        for name in reversed((*COMPONENT_NAMES, *ADDON_NAMES)):
            if stop_process(self.layout.pid_file(name)):
                stopped.append(name)
        if namespace is not None:
            netns.delete(namespace)
        return stopped

    def status(self) -> ClusterStatus:
        statuses = tuple(self._component_status(name) for name in COMPONENT_NAMES)
        nodes = None
        apiserver = statuses[1]
        if apiserver.state is ProcessState.RUNNING:
            try:
                nodes = summarize_nodes(self.client().get("/api/v1/nodes").json()["items"])
            except (OSError, ValueError, KeyError, DevClusterError):
                nodes = None
        return ClusterStatus(self.root, self.kubeconfig, statuses, nodes)

    def client(self, ports: Ports | None = None) -> ApiClient:
        pki = self.layout.pki
        return ApiClient(
            "127.0.0.1",
            (ports or self.layout.read_ports()).apiserver,
            ca_cert=pki.ca_cert,
            client_cert=pki.cert("admin"),
            client_key=pki.key("admin"),
        )

    def _check_not_running(self) -> bool:
        """True if the whole cluster already runs; an error if only part of it does."""
        states = {name: process_state(self.layout.pid_file(name)) for name in COMPONENT_NAMES}
        for name, state in states.items():
            if state is ProcessState.CRASHED:
                raise DevClusterError(
                    f"stale PID file {self.layout.pid_file(name)} ({name} is not running, log: "
                    f"{self.layout.log(name)}): run `phalanx dev down{self._dir_flag()}` first"
                )
        running = [name for name, state in states.items() if state is ProcessState.RUNNING]
        if running and len(running) != len(COMPONENT_NAMES):
            raise DevClusterError(
                f"only part of the cluster in {self.root} is running ({', '.join(running)}): "
                f"run `phalanx dev down{self._dir_flag()}` first"
            )
        return bool(running)

    def _dir_flag(self) -> str:
        return "" if self.root == paths.default_state_dir() else f" --dir {self.root}"

    def _prepare_files(
        self, ports: Ports, profile: str, *, real: int = 0, namespace: str | None = None
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.layout.etcd_data, ignore_errors=True)
        for name in COMPONENT_NAMES:
            self.layout.log(name).unlink(missing_ok=True)
        pki = ensure_pki(self.layout.pki.root)
        server = f"https://127.0.0.1:{ports.apiserver}"
        kubeconfigs = {"admin": self.kubeconfig}
        kubeconfigs.update(
            (stem, self.layout.component_kubeconfig(stem))
            for stem in ("controller-manager", "scheduler", "kwok")
        )
        users = {client.file_stem: client.user for client in CLIENTS}
        for stem, path in kubeconfigs.items():
            config = render_kubeconfig(
                cluster="phalanx-dev",
                server=server,
                ca_cert=pki.ca_cert,
                client_cert=pki.cert(stem),
                client_key=pki.key(stem),
                user=users[stem],
            )
            write_kubeconfig(path, config)
        kwok_stages.write_kwok_config(self.layout.kwok_config)
        chosen = profiles.get_profile(profile)
        self.layout.write_ports(
            ports,
            profile=profile,
            netns=namespace,
            realNodes=[
                {
                    "index": i + 1,
                    "name": f"{REAL_NODE_PREFIX}-{i + 1}",
                    "labels": real_node_labels(chosen, i, real),
                }
                for i in range(real)
            ],
        )

    def _start(self, plan: Iterable[Component], namespace: str | None = None) -> None:
        for component in plan:
            start_process(
                component.argv,
                pid_file=self.layout.pid_file(component.name),
                log_file=self.layout.log(component.name),
                preexec=netns.enter(namespace),
            )

    def _start_addon(
        self,
        name: str,
        argv: tuple[str, ...],
        *,
        binary: bool = False,
        namespace: str | None = None,
    ) -> None:
        start_process(
            argv if binary else (sys.executable, *argv),
            pid_file=self.layout.pid_file(name),
            log_file=self.layout.log(name),
            preexec=netns.enter(namespace),
        )

    def _wait_ready(self, plan: Iterable[Component], client: ApiClient, *, deadline: float) -> None:
        pending = list(plan)
        while pending:
            self._raise_if_exited(pending)
            pending = [c for c in pending if not self._is_healthy(c, client)]
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise DevClusterError(f"timed out waiting for {names} (logs in {self.root})")
            if pending:
                time.sleep(0.2)

    def _is_healthy(self, component: Component, client: ApiClient) -> bool:
        if component.health_url is None:
            return True
        if component.name == "kube-apiserver":
            try:
                return client.get("/readyz").status == 200
            except OSError:
                return False
        return probe(component.health_url)

    def _raise_if_exited(self, plan: Iterable[Component]) -> None:
        for component in plan:
            if process_state(self.layout.pid_file(component.name)) is not ProcessState.RUNNING:
                log = self.layout.log(component.name)
                raise DevClusterError(
                    f"{component.name} exited during start: {_explain_log(log)} (log: {log})"
                )

    def _wait_nodes_ready(
        self, client: ApiClient, names: set[str], plan: Iterable[Component], deadline: float
    ) -> None:
        while True:
            items = client.get("/api/v1/nodes?resourceVersion=0").json()["items"]
            ready = {n["metadata"]["name"] for n in items if node_is_schedulable(n)}
            if names <= ready:
                return
            self._raise_if_exited(plan)
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"only {len(names & ready)} of {len(names)} nodes became Ready and "
                    "schedulable "
                    f"(kwok log: {self.layout.log('kwok')})"
                )
            time.sleep(0.2)

    def _component_status(self, name: str) -> ComponentStatus:
        pid_file = self.layout.pid_file(name)
        record = read_pid_file(pid_file)
        return ComponentStatus(
            name=name,
            state=process_state(pid_file),
            pid=record.pid if record else None,
            log=self.layout.log(name),
            rss_bytes=resident_bytes(record) if record else 0,
        )


def create_nodes(client: ApiClient, nodes: list[dict[str, Any]]) -> None:
    """Create nodes concurrently; ones that already exist are left as they are."""

    def create(node: dict[str, Any]) -> None:
        reply = client.post("/api/v1/nodes", node)
        if reply.status not in (201, 409):
            name = node["metadata"]["name"]
            raise DevClusterError(
                f"creating node {name} failed with HTTP {reply.status}: {reply.body[:200]!r}"
            )

    with ThreadPoolExecutor(NODE_CREATE_WORKERS) as pool:
        list(pool.map(create, nodes))


def real_node_labels(profile: profiles.Profile, index: int, count: int) -> list[list[str]]:
    """Topology labels for real node `index` (0-based): its own rack after the fake ones.

    Real nodes report the machine's own capacity, so only the topology and profile labels
    are copied; `kubernetes.io/hostname` the kubelet sets itself.
    """
    place = profiles.host_places(profile, count)[index]
    labels = {
        profiles.REGION_LABEL: profiles.REGION,
        profiles.ZONE_LABEL: place.zone,
        profiles.BLOCK_LABEL: f"real-{place.block}",
        profiles.RACK_LABEL: f"real-{place.rack}",
        "phalanx.dev/profile": profile.name,
        **{label: f"real-{place.rack}" for label in profile.rack_labels},
    }
    return [[key, value] for key, value in sorted(labels.items())]


def render_corefile(kubeconfig: Path) -> str:
    """Cluster DNS for pods on real nodes: Services and pods of cluster.local, nothing else."""
    return f"""cluster.local:53 in-addr.arpa:53 {{
    bind {netns.DNS_IP}
    errors
    kubernetes cluster.local in-addr.arpa {{
        kubeconfig {kubeconfig} phalanx-dev
        pods insecure
        fallthrough in-addr.arpa
        ttl 5
    }}
}}
.:53 {{
    bind {netns.DNS_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def _ensure(client: ApiClient, path: str, body: dict[str, Any]) -> None:
    reply = client.post(path, body)
    if reply.status not in (201, 409):
        raise DevClusterError(
            f"creating {body['kind']} failed with HTTP {reply.status}: {reply.body[:200]!r}"
        )


def node_is_ready(node: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in node.get("status", {}).get("conditions", [])
    )


# Taints the node lifecycle controller keeps on a node until it has seen it Ready; kube-scheduler
# binds nothing there meanwhile, so `up` returns only once they are gone.
STARTUP_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})


def node_is_schedulable(node: dict[str, Any]) -> bool:
    """Ready, and no longer carrying the taints of a node that is not (yet) Ready."""
    taints = (node.get("spec") or {}).get("taints") or []
    return node_is_ready(node) and not any(t.get("key") in STARTUP_TAINTS for t in taints)


def summarize_nodes(nodes: list[dict[str, Any]]) -> NodeSummary:
    ready = [n for n in nodes if node_is_ready(n)]
    accelerators = {
        resource: sum(int(n["status"].get("allocatable", {}).get(resource, 0)) for n in ready)
        for resource in ACCELERATOR_RESOURCES
    }
    return NodeSummary(total=len(nodes), ready=len(ready), accelerators=accelerators)


def _profile_or_error(name: str) -> profiles.Profile:
    try:
        return profiles.get_profile(name)
    except ValueError as error:
        raise DevClusterError(str(error)) from None


def _explain_log(log: Path) -> str:
    """The log line that says why a component stopped, in one line."""
    try:
        lines = [
            line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "address already in use" in line:
            return (
                "a port it needs is already in use; run `phalanx dev up` again to pick free ports"
            )
    return lines[-1][:300] if lines else "no output"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _both(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    def preexec() -> None:
        if first is not None:
            first()
        second()

    return preexec
