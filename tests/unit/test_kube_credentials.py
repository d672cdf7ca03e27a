"""The operator logs in with what the kubernetes client loaded: a kubeconfig token, a
kubeconfig client certificate, or the in-cluster service account (token and CA files)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader

from phalanx import kube
from phalanx.handlers import login

SERVER = "https://127.0.0.1:6443"


def kubeconfig(tmp_path: Path, user: dict[str, Any]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": SERVER, "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def fresh_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kube.connect` loads once per process; each test loads its own configuration."""
    monkeypatch.setattr(kube, "_api", None)
    monkeypatch.setattr(client.Configuration, "_default", None)


def test_a_token_kubeconfig_logs_in_with_its_bearer_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_client: None
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, {"token": "s3cr3t"})))

    info = login()

    assert (info.server, info.scheme, info.token) == (SERVER, "Bearer", "s3cr3t")
    assert info.certificate_path is None
    assert info.insecure is True


def test_a_client_certificate_kubeconfig_logs_in_with_the_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_client: None
) -> None:
    user = {"client-certificate-data": b64("CERT"), "client-key-data": b64("KEY")}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, user)))

    info = login()

    assert info.token is None
    assert info.certificate_path is not None
    assert info.private_key_path is not None
    assert Path(info.certificate_path).read_text() == "CERT"
    assert Path(info.private_key_path).read_text() == "KEY"


def test_in_cluster_service_account_credentials(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    ca = tmp_path / "ca.crt"
    ca.write_text("CA")
    configuration = client.Configuration()
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    InClusterConfigLoader(str(token), str(ca), environ=environ).load_and_set(configuration)

    found = kube.credentials_of(configuration)

    assert found == kube.Credentials(
        server="https://10.96.0.1:443", ca_path=str(ca), scheme="bearer", token="sa-token"
    )


def test_the_token_is_read_where_older_clients_kept_it() -> None:
    configuration = client.Configuration(host=SERVER)
    configuration.api_key["authorization"] = "Bearer old-style"

    assert kube.credentials_of(configuration).token == "old-style"


def test_loading_a_kubeconfig_does_not_need_the_network(tmp_path: Path) -> None:
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(kubeconfig(tmp_path, {"token": "t"})), client_configuration=configuration
    )
    assert kube.credentials_of(configuration).token == "t"


def test_the_access_check_fails_when_the_api_server_is_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configuration = client.Configuration(host="https://127.0.0.1:1")
    configuration.retries = 0
    monkeypatch.setattr(kube, "_api", client.ApiClient(configuration))

    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        kube.check_access()
