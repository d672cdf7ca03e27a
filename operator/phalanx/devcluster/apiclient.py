"""A small HTTPS client for the dev cluster's own API server and component health probes.

The dev cluster needs a handful of calls (readiness, list nodes, create nodes); the standard
library does them with one keep-alive connection per thread, with no client-library start-up
cost and no dependence on the user's kubeconfig.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ApiClient:
    """Authenticated client for one API server, safe to share between threads."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_cert: Path,
        client_cert: Path,
        client_key: Path,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca_cert))
        self.context.load_cert_chain(str(client_cert), str(client_key))
        self._local = threading.local()

    def request(self, method: str, path: str, body: Any | None = None) -> Response:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            connection = self._connection()
            try:
                connection.request(method, path, body=payload, headers=headers)
                reply = connection.getresponse()
                return Response(reply.status, reply.read())
            except (http.client.HTTPException, OSError):
                # A dropped keep-alive connection is retried once on a fresh one.
                self._drop_connection()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Response:
        return self.request("POST", path, body)

    def close(self) -> None:
        self._drop_connection()

    def _connection(self) -> http.client.HTTPSConnection:
        connection: http.client.HTTPSConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=self.timeout
            )
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def probe(url: str, *, timeout: float = 2.0) -> bool:
    """True when a component's health endpoint answers 200 (self-signed certs accepted)."""
    scheme, _, rest = url.partition("://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    connection: http.client.HTTPConnection
    if scheme == "https":
        # Component serving certs are self-signed at start; this is a liveness probe only.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", "/" + path)
        return connection.getresponse().status == 200
    except (http.client.HTTPException, OSError):
        return False
    finally:
        connection.close()
