"""Certificates and channel security for the cluster: one CA, one certificate per service.

Every service reads the same three files (``tls_cert_file``, ``tls_key_file``,
``tls_ca_file``) into a :class:`ClusterSecurity`. With all three set the cluster runs on
mutual TLS: servers require a client certificate signed by the cluster CA, clients verify
the server's certificate against it and present their own. Each certificate names its
holder with a SPIFFE-style URI SAN, ``spiffe://<cluster_name>/<role>``; the cluster-auth
interceptor (:mod:`pdserve.cluster_auth`) admits only peers whose certificate names a
service of this cluster. Without certificates a shared ``cluster_token`` (sent as the
``x-pdserve-cluster-token`` metadata entry) stands in for them.

:func:`make_cluster_pki` writes a throw-away CA and the services' certificates (``pdserve up
--tls`` and the tests); production mounts real ones (README: "Security").
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdserve.cluster_auth import (
    SERVICE_ROLES,
    ClusterAuthPolicy,
    TokenClientInterceptor,
    aio_token_interceptors,
    spiffe_id,
)

if TYPE_CHECKING:
    from pdserve.config import ServiceSettings


# ---- issuing certificates -----------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


def _name(common_name: str, cluster_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(builder: x509.CertificateBuilder, valid_days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=valid_days)
    )


def make_ca(cluster_name: str, *, valid_days: int = 7) -> Pem:
    """A self-signed CA for one cluster (P-256, short-lived: it is meant to be thrown away)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{cluster_name} cluster CA", cluster_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    )
    cert = _validity(builder, valid_days).sign(key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_certificate(
    ca: Pem,
    cluster_name: str,
    role: str,
    *,
    hosts: Iterable[str] = ("localhost",),
    valid_days: int = 7,
) -> Pem:
    """A server-and-client certificate for ``role``, valid for ``hosts`` (names or IPs)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(cluster_name, role))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(role, cluster_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )  # fmt: skip
    )
    cert = _validity(builder, valid_days).sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class ClusterPki:
    """Where :func:`make_cluster_pki` wrote the files: ``ca.pem``, ``<role>.pem``, ``<role>-key.pem``."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def cert_file(self, role: str) -> Path:
        return self.directory / f"{role}.pem"

    def key_file(self, role: str) -> Path:
        return self.directory / f"{role}-key.pem"

    def env(self, role: str) -> dict[str, str]:
        """The ``PDSERVE_TLS_*`` variables that put one service on these files."""
        return {
            "PDSERVE_TLS_CERT_FILE": str(self.cert_file(role)),
            "PDSERVE_TLS_KEY_FILE": str(self.key_file(role)),
            "PDSERVE_TLS_CA_FILE": str(self.ca_file),
        }


def default_hosts() -> list[str]:
    """Names a local stack is reached by: loopback, ``localhost`` and this host's name."""
    return sorted({"localhost", socket.gethostname(), "127.0.0.1", "::1"})


def make_cluster_pki(
    directory: Path,
    cluster_name: str,
    *,
    roles: Sequence[str] = SERVICE_ROLES,
    hosts: Iterable[str] | None = None,
    valid_days: int = 7,
) -> ClusterPki:
    """Write a fresh CA and one certificate per role into ``directory`` (keys mode 0600).

    The CA's key is not written: nothing more can be issued once this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = ClusterPki(directory)
    ca = make_ca(cluster_name, valid_days=valid_days)
    pki.ca_file.write_bytes(ca.cert)
    host_list = list(hosts or default_hosts())
    for role in roles:
        pem = issue_certificate(ca, cluster_name, role, hosts=host_list, valid_days=valid_days)
        pki.cert_file(role).write_bytes(pem.cert)
        _write_private(pki.key_file(role), pem.key)
    return pki


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# ---- using them ---------------------------------------------------------------------------


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


@dataclass(frozen=True)
class ClusterSecurity:
    """How one process talks to its cluster: certificates, the CA, the cluster token.

    ``mutual``: certificate, key and CA are all set (mTLS). ``token``: sent on every call and
    required by servers when set. Neither: plain text and open (development only). The files
    are read once, when first used.
    """

    cluster_name: str = "pdserve"
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    token: str | None = field(default=None, repr=False)  # never in a log line
    server_name: str | None = None

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ClusterSecurity:
        token = settings.cluster_token.get_secret_value() if settings.cluster_token else None
        return cls(
            cluster_name=settings.cluster_name,
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            ca_file=settings.tls_ca_file,
            token=token,
            server_name=settings.tls_server_name,
        )

    @functools.cached_property
    def cert_pem(self) -> bytes | None:
        return _read(self.cert_file)

    @functools.cached_property
    def key_pem(self) -> bytes | None:
        return _read(self.key_file)

    @functools.cached_property
    def ca_pem(self) -> bytes | None:
        return _read(self.ca_file)

    @property
    def mutual(self) -> bool:
        return None not in (self.cert_file, self.key_file, self.ca_file)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None

    # -- servers --

    def auth_policy(self) -> ClusterAuthPolicy:
        """What this process's servers demand of cluster callers."""
        return ClusterAuthPolicy(self.cluster_name, mutual=self.mutual, token=self.token)

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """TLS with this service's certificate; with a CA, clients must present one it signed."""
        if self.cert_pem is None or self.key_pem is None:
            raise ValueError("a TLS server needs tls_cert_file and tls_key_file")
        require = require_client_auth and self.ca_pem is not None
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem if require else None,
            require_client_auth=require,
        )

    def add_port(self, server: Any, address: str, *, require_client_auth: bool = True) -> int:
        """Bind ``address`` on ``server`` (sync or aio): TLS when a certificate is set."""
        if not self.tls:
            return server.add_insecure_port(address)
        creds = self.server_credentials(require_client_auth=require_client_auth)
        return server.add_secure_port(address, creds)

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """For an HTTPS listener with this certificate (clients are not asked for one)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    # -- clients --

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca_pem is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """``server_name``: the name every service certificate carries, whatever address is dialed."""
        if self.ca_pem is None or not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A sync channel to a cluster peer (mTLS when configured), sending the token."""
        opts = options + self.channel_options()
        creds = self.channel_credentials()
        channel = (
            grpc.secure_channel(address, creds, options=opts)
            if creds is not None
            else grpc.insecure_channel(address, options=opts)
        )
        if self.token:
            channel = grpc.intercept_channel(channel, TokenClientInterceptor(self.token))
        return channel

    def aio_channel(
        self, address: str, options: list[tuple[str, Any]], interceptors: Sequence[Any] = ()
    ) -> grpc.aio.Channel:
        """A grpc.aio channel to a cluster peer; ``interceptors`` run after the token's."""
        opts = options + self.channel_options()
        chain = [*aio_token_interceptors(self.token), *interceptors]
        creds = self.channel_credentials()
        if creds is not None:
            return grpc.aio.secure_channel(address, creds, options=opts, interceptors=chain)
        return grpc.aio.insecure_channel(address, options=opts, interceptors=chain)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """For HTTPS calls to a cluster service (the launcher's readiness checks)."""
        if self.ca_pem is None:
            return None
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        if self.tls:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context
