from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from phalanx.devcluster import certs


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_apiserver_certificate_serves_loopback_names(tmp_path: Path) -> None:
    pki = certs.ensure_pki(tmp_path / "pki")

    cert = load(pki.cert("apiserver"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kubernetes.default.svc"} <= set(names.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    cert.verify_directly_issued_by(load(pki.ca_cert))


def test_a_webhook_serving_certificate_is_for_loopback_and_serving_only(tmp_path: Path) -> None:
    pki = certs.ensure_pki(tmp_path / "pki")
    certs.issue_server(pki, "hook", "hook")

    cert = load(pki.cert("hook"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" not in names.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(load(pki.ca_cert))


def test_admin_is_in_system_masters(tmp_path: Path) -> None:
    pki = certs.ensure_pki(tmp_path / "pki")

    subject = load(pki.cert("admin")).subject
    groups = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert groups == ["system:masters"]


def test_controller_manager_identity_matches_its_bootstrap_role(tmp_path: Path) -> None:
    pki = certs.ensure_pki(tmp_path / "pki")

    subject = load(pki.cert("controller-manager")).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "system:kube-controller-manager"
    )


def test_existing_pki_is_kept_and_keys_are_private(tmp_path: Path) -> None:
    pki = certs.ensure_pki(tmp_path / "pki")
    first = pki.ca_cert.read_bytes()

    assert certs.ensure_pki(tmp_path / "pki").ca_cert.read_bytes() == first
    assert pki.ca_key.stat().st_mode & 0o077 == 0
    assert pki.service_account_pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
