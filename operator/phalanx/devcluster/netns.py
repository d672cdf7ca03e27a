"""The dev cluster's own network namespace, and how processes get into and out of it.

Wherever the machine allows it (root, `ip`), the whole cluster lives in one network namespace
that `dev up` creates and `dev down` removes: the control plane, the fake pods' addresses and,
with real nodes, CoreDNS, every kubelet and containerd, the node bridge and the pods' veths.
The namespace has no default route, so nothing in it can leave the machine, and no link,
route or firewall rule of the machine's own namespace is touched.

Processes enter it by `setns(2)` just before they exec (`enter` as a `preexec_fn`); the
relay (`python -m phalanx.devcluster.relay`) binds its listening sockets in the machine's
namespace first and then enters, so kubectl and the tests reach the API server on the same
127.0.0.1 port as without real nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from phalanx.devcluster.errors import DevClusterError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
# Node and DNS addresses on the cluster bridge; pods get 10.244.<node>.0/24 behind each node.
NODE_SUBNET = "10.88.0"
DNS_IP = f"{NODE_SUBNET}.53"
CLUSTER_BRIDGE = "phxnodes"


def available() -> str | None:
    """Why this machine cannot give a cluster its own namespace, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` is not installed (apt-get install iproute2)"
    return None


def namespace_name(root: Path) -> str:
    """A stable, short name per cluster directory, so two clusters never share a namespace."""
    return "phalanx-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]


def namespace_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return namespace_path(name).exists()


def create(name: str) -> None:
    """The namespace with loopback, the node bridge (DNS address on it) and forwarding on."""
    if exists(name):
        delete(name)
    _ip("netns", "add", name)
    for args in (
        ("link", "set", "lo", "up"),
        ("link", "add", CLUSTER_BRIDGE, "type", "bridge"),
        ("addr", "add", f"{DNS_IP}/24", "dev", CLUSTER_BRIDGE),
        ("link", "set", CLUSTER_BRIDGE, "up"),
    ):
        _ip("-n", name, *args)
    # Pods on different nodes reach each other through this namespace's routing table; the
    # setting is per namespace (the machine's own stays as it is).
    run_in(name, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])


def add_address(name: str, address: str) -> None:
    _ip("-n", name, "addr", "replace", f"{address}/24", "dev", CLUSTER_BRIDGE)


def delete(name: str) -> None:
    """Remove the namespace, and `/run/netns` too when `ip netns add` made it for us."""
    if exists(name):
        _ip("netns", "delete", name)
    if NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
        subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            NETNS_DIR.rmdir()


def setns(path: Path) -> None:
    """Move the calling thread into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns_fd(fd, str(path))
    finally:
        os.close(fd)


def _setns_fd(fd: int, what: str = "the previous namespace") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns({what}): {os.strerror(error)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the calling thread inside the namespace for a while (threads and processes it
    starts meanwhile are born there), then move it back where it was."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(namespace_path(name))
        try:
            yield
        finally:
            _setns_fd(home)
    finally:
        os.close(home)


def enter(name: str | None) -> Callable[[], None] | None:
    """A `preexec_fn` that moves the child into the namespace (None: stay where we are)."""
    if name is None:
        return None
    path = namespace_path(name)
    return lambda: setns(path)


def run_in(name: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, preexec_fn=enter(name), capture_output=True, text=True, check=False, **kwargs
    )  # type: ignore[call-overload]
    if result.returncode != 0:
        raise DevClusterError(f"{' '.join(argv)} in {name} failed: {result.stderr.strip()}")
    return result  # type: ignore[no-any-return]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DevClusterError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
