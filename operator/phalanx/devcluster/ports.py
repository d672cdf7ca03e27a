"""Loopback port selection: free ports for every component, or a clear error for a taken one."""

from __future__ import annotations

import contextlib
import socket

from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.layout import Ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel reports free right now, all distinct (held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def choose_ports(apiserver_port: int | None = None) -> Ports:
    if apiserver_port is not None and not port_is_free(apiserver_port):
        raise DevClusterError(
            f"port {apiserver_port} on 127.0.0.1 is already in use: pass another --port, "
            "or leave --port out to pick a free one"
        )
    chosen = free_ports(6)
    return Ports(
        apiserver=apiserver_port if apiserver_port is not None else chosen[0],
        etcd_client=chosen[1],
        etcd_peer=chosen[2],
        controller_manager=chosen[3],
        scheduler=chosen[4],
        kwok=chosen[5],
    )
