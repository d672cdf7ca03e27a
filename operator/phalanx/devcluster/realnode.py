"""Real kubelet nodes for the dev cluster: containerd + runc + CNI bridge + kubelet.

A real node is a directory of configuration (rendered here by pure functions), a private
mount namespace started by `node/node-run.sh` inside the cluster's network namespace, and
its own cgroup root in every cgroup hierarchy. Nothing on the machine outside those changes:

- kernel settings: the kubelet runs with `protectKernelDefaults` and reads the values it
  checks from files bound over /proc/sys inside the node's mount namespace, where every global
  kernel.*/vm.* file is read-only (see node-run.sh);
- network: node addresses live on the cluster namespace's bridge, pods on a per-node CNI
  bridge in the same namespace (10.244.<index>.0/24), so pods on different nodes reach each
  other through that namespace's routing table;
- processes and mounts: `stop` kills the kubelet, every container (by the node's cgroups),
  then containerd and the shims (by the node's mount namespace); the mount namespace goes
  with its last process.

Images are kept between clusters in a per-node containerd root under the cache, so loading
the trainer's multi-GB image happens once per node, not once per `dev up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phalanx.devcluster import netns, paths
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.versions import CONTAINERD_VERSION

NODE_RUN = Path(__file__).with_name("node") / "node-run.sh"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
RUNC_CANDIDATES = ("/usr/sbin/runc", "/usr/bin/runc")
REAL_NODE_LABEL = "phalanx.dev/real-node"
# The tunables the kubelet checks when protectKernelDefaults is set, with the values it wants.
KUBELET_SYSCTLS = {
    "vm.overcommit_memory": "1",
    "vm.panic_on_oom": "0",
    "kernel.panic": "10",
    "kernel.panic_on_oops": "1",
    "kernel.keys.root_maxkeys": "1000000",
    "kernel.keys.root_maxbytes": "25000000",
}


@dataclass(frozen=True)
class RealNode:
    """One real node of one cluster: its name, addresses and directories."""

    cluster_root: Path
    index: int  # 1-based
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def dir(self) -> Path:
        return self.cluster_root / "nodes" / self.name

    @property
    def ip(self) -> str:
        return f"{netns.NODE_SUBNET}.{10 + self.index}"

    @property
    def pod_subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def bridge(self) -> str:
        return f"phxcni{self.index}"

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def store(self) -> Path:
        """containerd's root (images), kept across clusters; one per node index."""
        return paths.cache_root() / "node-stores" / CONTAINERD_VERSION / f"node-{self.index}"

    @property
    def cgroup_path(self) -> str:
        return f"/{netns.namespace_name(self.cluster_root)}/{self.name}"


def render_containerd_config(node: RealNode, runc: str, cni_bin: str, pause_image: str) -> str:
    d = node.dir
    return f"""version = 3
root = "{node.store}"
state = "{d}/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri"]
[grpc]
  address = "{node.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  pinned_images = {{sandbox = "{pause_image}"}}
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  # No CAP_SYS_RESOURCE in a container: a negative oom_score_adj (Guaranteed pods) would fail.
  restrict_oom_score_adj = true
  cni = {{bin_dirs = ["{cni_bin}"], conf_dir = "{d}/cni/net.d", max_conf_num = 1}}
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  options = {{BinaryName = "{runc}", SystemdCgroup = false}}
"""


def render_cni_config(node: RealNode) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": f"phalanx-{node.name}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.dir / "cni" / "ipam"),
                    "ranges": [[{"subnet": node.pod_subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def render_kubelet_config(node: RealNode, ca_cert: Path, resolv_conf: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": node.ip,
        "healthzPort": 10248,
        # The API server authenticates with its kubelet client certificate; requests are
        # authorised by the API server (SubjectAccessReview), as on a kubeadm cluster.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_path,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failCgroupV1": False,
        "failSwapOn": False,
        "protectKernelDefaults": True,
        "oomScoreAdj": 0,
        "clusterDNS": [netns.DNS_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": str(resolv_conf),
        "podLogsDir": "/var/log/pods",
        # The disk is shared with everything else on the machine: evict only when it is
        # really full, and never garbage-collect the (large, locally built) images.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 30,
        "registerWithTaints": [],
    }


def kubelet_args(node: RealNode, kubeconfig: Path) -> list[str]:
    labels = ",".join(f"{key}={value}" for key, value in (*node.labels, (REAL_NODE_LABEL, "true")))
    return [
        f"--config={node.dir / 'kubelet.yaml'}",
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node.name}",
        f"--node-ip={node.ip}",
        f"--root-dir={node.dir / 'kubelet'}",
        f"--node-labels={labels}",
        "--v=1",
    ]


def cgroup_mounts() -> list[str]:
    """The machine's cgroup mount lines, re-mounted inside each node's mount namespace."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line for line in lines if line.split()[2:3] in (["cgroup"], ["cgroup2"])]


def cgroup_dirs(node: RealNode, *, every: bool = False) -> list[Path]:
    """The node's cgroup root in every hierarchy the kubelet uses (v1: one per controller;
    v2: the one). `every` adds the v2 hierarchy of a hybrid machine, where runc also makes
    directories, for cleaning up."""
    mounts = cgroup_mounts()
    hybrid = any(m.split()[2] == "cgroup" for m in mounts)
    dirs = []
    for line in mounts:
        target, kind = line.split()[1:3]
        if kind == "cgroup2" and hybrid and not every:
            continue
        dirs.append(Path(target + node.cgroup_path))
    return dirs


def find_runc() -> str:
    for candidate in RUNC_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise DevClusterError("runc is not installed: `apt-get install runc` (Debian's package)")


def find_cni_bin() -> str:
    for candidate in CNI_BIN_DIRS:
        if all(
            os.access(f"{candidate}/{p}", os.X_OK) for p in ("bridge", "host-local", "loopback")
        ):
            return candidate
    raise DevClusterError(
        "CNI plugins are not installed: `apt-get install containernetworking-plugins`"
    )


def check_host() -> None:
    """What real nodes need from the machine, each with the way to get it."""
    if os.geteuid() != 0:
        raise DevClusterError("real nodes need root (network and mount namespaces, cgroups)")
    for tool in ("ip", "unshare", "iptables"):
        if shutil.which(tool) is None:
            package = "iptables" if tool == "iptables" else "iproute2 / util-linux"
            raise DevClusterError(f"{tool} is not installed: `apt-get install {package}`")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise DevClusterError("the kernel has no overlay file system, which containerd needs")
    if not cgroup_mounts():
        raise DevClusterError("no cgroup hierarchy is mounted")
    find_runc()
    find_cni_bin()


def claim_store(node: RealNode) -> None:
    """Make this cluster the owner of the node's image store, unless a live one owns it."""
    node.store.mkdir(parents=True, exist_ok=True)
    owner_file = node.store.parent / f"{node.store.name}.owner"
    try:
        owner = Path(owner_file.read_text().strip())
    except OSError:
        owner = None
    if owner is not None and owner != node.cluster_root:
        pid = _read_pid(owner / "nodes" / node.name / "node-run.pid")
        if pid is not None and _alive(pid):
            raise DevClusterError(
                f"the dev cluster in {owner} runs real node {node.index} (its image store "
                f"{node.store} is in use): stop it with `phalanx dev down --dir {owner}` first"
            )
    owner_file.write_text(f"{node.cluster_root}\n")


class NodeProcess:
    """Start, wait for and stop one real node."""

    def __init__(self, node: RealNode, namespace: str, bin_dir: Path) -> None:
        self.node = node
        self.namespace = namespace
        self.bin_dir = bin_dir

    def configure(self, kubeconfig: Path, ca_cert: Path, resolv_conf: Path, pause: str) -> None:
        node, d = self.node, self.node.dir
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("run", "log", "kubelet", "cni/net.d", "cni/ipam", "sysctl", "containerd-state"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        node.store.mkdir(parents=True, exist_ok=True)
        (d / "bin-dir").write_text(str(self.bin_dir))
        (d / "cgroup-mounts").write_text("\n".join(cgroup_mounts()) + "\n")
        (d / "containerd.toml").write_text(
            render_containerd_config(node, find_runc(), find_cni_bin(), pause)
        )
        (d / "cni/net.d/10-phalanx.conflist").write_text(json.dumps(render_cni_config(node)))
        (d / "kubelet.yaml").write_text(
            json.dumps(render_kubelet_config(node, ca_cert, resolv_conf), indent=2)
        )
        (d / "kubelet.args").write_text(" ".join(kubelet_args(node, kubeconfig)))
        for key, value in KUBELET_SYSCTLS.items():
            (d / "sysctl" / key).write_text(value + "\n")
        for directory in cgroup_dirs(node):
            directory.mkdir(parents=True, exist_ok=True)
            _inherit_cpuset(directory)
        netns.add_address(self.namespace, node.ip)

    def start(self) -> None:
        d = self.node.dir
        with open(d / "node-run.log", "ab") as log:
            process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", str(NODE_RUN), str(d)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=netns.enter(self.namespace),
            )
        (d / "node-run.pid").write_text(str(process.pid))

    def wait_for_containerd(self, deadline: float) -> None:
        while not self.node.socket.exists():
            self.raise_if_exited()
            if time.monotonic() > deadline:
                raise DevClusterError(
                    f"containerd of {self.node.name} did not start: {self._log()}"
                )
            time.sleep(0.1)

    def start_kubelet(self) -> None:
        (self.node.dir / "start-kubelet").touch()

    def raise_if_exited(self) -> None:
        pid = _read_pid(self.node.dir / "node-run.pid")
        if pid is None or not _alive(pid):
            raise DevClusterError(f"node {self.node.name} exited: {self._log()}")

    def _log(self) -> str:
        lines: list[str] = []
        for name in ("node-run.log", "containerd.log", "kubelet.log"):
            path = self.node.dir / name
            if path.exists():
                lines += [
                    f"{name}: {line}" for line in path.read_text(errors="replace").splitlines()[-3:]
                ]
        return " | ".join(lines) or "no log"

    def stop(self, timeout: float = 20.0) -> bool:
        """Kubelet, then containers, then containerd and shims; True if anything ran."""
        d = self.node.dir
        runner = _read_pid(d / "node-run.pid")
        ran = runner is not None and _alive(runner)
        mount_ns = _mount_namespace(runner) if ran and runner is not None else None
        kubelet = _read_pid(d / "kubelet.pid")
        if kubelet is not None and _alive(kubelet) and _mount_namespace(kubelet) == mount_ns:
            _terminate([kubelet], timeout)
        for directory in cgroup_dirs(self.node, every=True):
            _kill_cgroup_tree(directory)
        if mount_ns is not None:
            _terminate(_processes_in_mount_namespace(mount_ns), timeout)
        for directory in cgroup_dirs(self.node, every=True):
            _remove_cgroup_tree(directory)
        _remove_empty_parent(cgroup_dirs(self.node, every=True))
        for leftover in ("node-run.pid", "kubelet.pid", "containerd.pid", "start-kubelet"):
            (d / leftover).unlink(missing_ok=True)
        return ran


def _inherit_cpuset(directory: Path) -> None:
    """cpuset v1 needs cpus and mems in every level before a task may join."""
    for level in reversed([directory, *directory.parents]):
        cpus, mems = level / "cpuset.cpus", level / "cpuset.mems"
        if cpus.exists() and not cpus.read_text().strip():
            cpus.write_text((level.parent / "cpuset.cpus").read_text())
            mems.write_text((level.parent / "cpuset.mems").read_text())


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _processes_in_mount_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _mount_namespace(int(entry.name)) == namespace:
            pids.append(int(entry.name))
    return pids


def _terminate(pids: list[int], timeout: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_cgroup_tree(directory: Path) -> None:
    if not directory.is_dir():
        return
    for procs in directory.rglob("cgroup.procs"):
        for line in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def _remove_cgroup_tree(directory: Path) -> None:
    if not directory.is_dir():
        return
    deadline = time.monotonic() + 10
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir_when_empty(sub, deadline)
    _rmdir_when_empty(directory, deadline)


def _rmdir_when_empty(directory: Path, deadline: float) -> None:
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while killed tasks are still leaving
            if time.monotonic() > deadline:
                raise DevClusterError(f"cannot remove cgroup {directory}: tasks remain") from None
            time.sleep(0.1)


def _remove_empty_parent(directories: list[Path]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.parent.rmdir()
