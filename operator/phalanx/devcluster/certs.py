"""The dev cluster's PKI: one CA, serving and client certificates, service-account keys.

Every key is ECDSA P-256: generating a whole PKI takes milliseconds and kube-apiserver
signs service-account tokens with ES256 just as well as with RSA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
LOOPBACK_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
LOOPBACK_IPS = ("127.0.0.1", "::1")
# First address of the default service CIDR: the `kubernetes` Service's ClusterIP.
KUBERNETES_SERVICE_IP = "10.96.0.1"
FRONT_PROXY_CA = "front-proxy-ca"
FRONT_PROXY_CLIENT = "front-proxy-client"


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's subject: CN is the user, O entries are groups."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


CLIENTS = (
    ClientIdentity("admin", "phalanx-admin", ("system:masters",)),
    ClientIdentity("controller-manager", "system:kube-controller-manager"),
    ClientIdentity("scheduler", "system:kube-scheduler"),
    # kwok plays every kubelet at once; node authorization cannot express that.
    ClientIdentity("kwok", "kwok", ("system:masters",)),
    ClientIdentity("apiserver-etcd-client", "kube-apiserver-etcd-client"),
    # kubectl exec/logs/port-forward: the API server's identity towards real kubelets.
    ClientIdentity(
        "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
    ),
)


@dataclass(frozen=True)
class Pki:
    """File locations of the generated PKI inside a cluster's state directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def cert(self, stem: str) -> Path:
        return self.root / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.root / f"{stem}.key"

    @property
    def service_account_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def service_account_pub(self) -> Path:
        return self.root / "sa.pub"

    def complete(self) -> bool:
        expected = [self.ca_cert, self.ca_key, self.service_account_key, self.service_account_pub]
        stems = ("apiserver", "etcd-server", FRONT_PROXY_CA, FRONT_PROXY_CLIENT)
        for stem in (*stems, *(c.file_stem for c in CLIENTS)):
            expected += [self.cert(stem), self.key(stem)]
        return all(path.exists() for path in expected)


def ensure_pki(root: Path, now: datetime.datetime | None = None) -> Pki:
    """Create the PKI under `root` unless a complete one is already there."""
    pki = Pki(root)
    if pki.complete():
        return pki
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    issued = now or datetime.datetime.now(datetime.UTC)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, issued)
    _write_pair(pki.ca_cert, pki.ca_key, ca_cert, ca_key)

    serving_names = x509.SubjectAlternativeName(
        [x509.DNSName(name) for name in LOOPBACK_NAMES]
        + [
            x509.IPAddress(ipaddress.ip_address(ip))
            for ip in (*LOOPBACK_IPS, KUBERNETES_SERVICE_IP)
        ]
    )
    server = [ExtendedKeyUsageOID.SERVER_AUTH]
    # etcd's gRPC gateway dials its own client port with the serving certificate.
    server_and_client = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for stem, common_name, usages in (
        ("apiserver", "kube-apiserver", server),
        ("etcd-server", "etcd", server_and_client),
    ):
        key = _new_key()
        cert = _issue(ca_cert, ca_key, key, _name(common_name), issued, usages, serving_names)
        _write_pair(pki.cert(stem), pki.key(stem), cert, key)

    for client in CLIENTS:
        key = _new_key()
        subject = _name(client.user, client.groups)
        cert = _issue(ca_cert, ca_key, key, subject, issued, [ExtendedKeyUsageOID.CLIENT_AUTH])
        _write_pair(pki.cert(client.file_stem), pki.key(client.file_stem), cert, key)

    # A separate CA for the aggregation layer's request-header authentication, as kubeadm does:
    # certificates of the main CA must not be able to assert arbitrary X-Remote-User headers.
    proxy_ca_key = _new_key()
    proxy_ca_cert = _ca_certificate(proxy_ca_key, issued, "phalanx-dev-front-proxy-ca")
    _write_pair(pki.cert(FRONT_PROXY_CA), pki.key(FRONT_PROXY_CA), proxy_ca_cert, proxy_ca_key)
    proxy_key = _new_key()
    proxy_cert = _issue(
        proxy_ca_cert,
        proxy_ca_key,
        proxy_key,
        _name(FRONT_PROXY_CLIENT),
        issued,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_pair(pki.cert(FRONT_PROXY_CLIENT), pki.key(FRONT_PROXY_CLIENT), proxy_cert, proxy_key)

    sa_key = _new_key()
    _write_private(pki.service_account_key, sa_key)
    pki.service_account_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def issue_client(pki: Pki, identity: ClientIdentity, now: datetime.datetime | None = None) -> None:
    """A client certificate signed by the cluster CA (a real node's kubelet, for one)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    subject = _name(identity.user, identity.groups)
    issued = now or datetime.datetime.now(datetime.UTC)
    cert = _issue(ca_cert, ca_key, key, subject, issued, [ExtendedKeyUsageOID.CLIENT_AUTH])
    _write_pair(pki.cert(identity.file_stem), pki.key(identity.file_stem), cert, key)


def issue_server(
    pki: Pki, stem: str, common_name: str, now: datetime.datetime | None = None
) -> None:
    """A serving certificate for loopback signed by the cluster CA (a webhook the API
    server calls on 127.0.0.1, for one)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost")]
        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    )
    key = _new_key()
    issued = now or datetime.datetime.now(datetime.UTC)
    cert = _issue(
        ca_cert, ca_key, key, _name(common_name), issued, [ExtendedKeyUsageOID.SERVER_AUTH], names
    )
    _write_pair(pki.cert(stem), pki.key(stem), cert, key)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, issued: datetime.datetime, common_name: str = "phalanx-dev-ca"
) -> x509.Certificate:
    subject = _name(common_name)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - datetime.timedelta(minutes=5))
        .not_valid_after(issued + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    issued: datetime.datetime,
    usages: list[x509.ObjectIdentifier],
    alt_names: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - datetime.timedelta(minutes=5))
        .not_valid_after(issued + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(pem)
