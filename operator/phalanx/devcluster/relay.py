"""A TCP relay from the machine's loopback into the dev cluster's network namespace.

`python -m phalanx.devcluster.relay NETNS_PATH HOST:PORT[=TARGET_HOST:TARGET_PORT] ...`
binds every listener in the namespace it was started in, then moves into NETNS_PATH and
connects each accepted connection to its target there (by default the same address and port).
A listening socket keeps the namespace it was created in, so one process serves both sides.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

from phalanx.devcluster.netns import setns

BUFFER = 1 << 16


def parse_route(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, _, target = text.partition("=")
    host, _, port = listen.rpartition(":")
    source = (host, int(port))
    if not target:
        return source, source
    target_host, _, target_port = target.rpartition(":")
    return source, (target_host, int(target_port))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _handler(target: tuple[str, int]):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    return handle


async def serve(listeners: list[tuple[socket.socket, tuple[str, int]]]) -> None:
    servers = [
        await asyncio.start_server(_handler(target), sock=sock) for sock, target in listeners
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> None:
    namespace, *routes = argv
    listeners = []
    for route in routes:
        source, target = parse_route(route)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
        sock.listen(128)
        listeners.append((sock, target))
    setns(Path(namespace))  # before any thread exists: the event loop runs in the namespace
    asyncio.run(serve(listeners))


if __name__ == "__main__":
    main(sys.argv[1:])
