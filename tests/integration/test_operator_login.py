"""The operator logs in with a token kubeconfig (a service account's token, as a CI runner or a
user would hand it), acts with it, and its liveness endpoint turns red the moment the API
server refuses it."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobkit import Jobs, outcome
from kubernetes import client

from phalanx import kube
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


@pytest.fixture
def token_kubeconfig(
    dev_cluster: ClusterHandle,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """KUBECONFIG is a kubeconfig whose user is a bearer token of a cluster-admin service
    account; yields the name of the ClusterRoleBinding that grants it."""
    binding = f"{namespace}-operator"
    kubectl("create", "serviceaccount", "operator", "-n", namespace)
    kubectl(
        "create", "clusterrolebinding", binding,
        "--clusterrole=cluster-admin", f"--serviceaccount={namespace}:operator",
    )  # fmt: skip
    token = kubectl("create", "token", "operator", "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(dev_cluster.kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"][:1],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [
            {
                "name": "operator",
                "context": {"cluster": admin["clusters"][0]["name"], "user": "operator"},
            }
        ],
        "current-context": "operator",
    }
    path = tmp_path / "token-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The client is loaded once per process: this test's operator must load the token.
    monkeypatch.setattr(kube, "_api", None)
    monkeypatch.setattr(client.Configuration, "_default", None)
    try:
        yield binding
    finally:
        kubectl("delete", "clusterrolebinding", binding, "--ignore-not-found", check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_token_kubeconfig_login_and_liveness_that_follows_api_access(
    kubectl: Kubectl, run_operator: Callable[..., Any], namespace: str, token_kubeconfig: str
) -> None:
    jobs = Jobs(kubectl, namespace)
    url = f"http://127.0.0.1:{free_port()}/healthz"
    with run_operator("--liveness", url):
        jobs.apply("with-token", accelerator={"type": "cpu", "cpu": "100m"},
                   podTemplate=outcome("Succeeded", "2s"))  # fmt: skip
        jobs.wait_phase("with-token", "Succeeded", timeout=90)
        assert wait_for(lambda: health(url) == 200, 30, "/healthz to answer 200")

        kubectl("delete", "clusterrolebinding", token_kubeconfig)

        # kopf caches probe results for 10 s; RBAC changes reach the authorizer within seconds.
        wait_for(lambda: health(url) == 500, 60, "/healthz to fail once access is gone")
