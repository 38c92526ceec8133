"""X.509 material for TLS listeners (cryptography): a CA, server certificates, and client
certificates bound to a DID, issued alongside each DeviceCredential.

    ca = CertificateAuthority.create("pki/")                 # or CertificateAuthority.load(...)
    files = ca.issue_for_did(device_did, "pki/devices/")     # subject CN = client_token(did)
    files = ca.issue_for_credential(device_credential, "pki/devices/")  # same, expiry = validUntil

A Mosquitto listener with ``use_identity_as_username true`` then sees the DID token as the
username, which its ``%u`` ACL patterns use (``brokers.mosquitto``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdk.messaging.topics import client_token


@dataclass(frozen=True)
class CertFiles:
    """PEM paths of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKIFiles:
    """A CA with one server certificate (for ``hosts``) and one client certificate."""

    ca: Path
    server: CertFiles
    client: CertFiles
    ca_key: Path | None = None  # present when more certificates can be issued (``CertificateAuthority``)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    cn: str,
    *,
    hosts: tuple[str, ...],
    client: bool,
    days: int,
    uris: tuple[str, ...] = (),
    not_after: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                   else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey, name: str, days: int) -> x509.Certificate:
    ca_name = _name(name)
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )


class CertificateAuthority:
    """A CA (certificate and key on disk) that issues server and per-DID client certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path,
                 key_path: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.cert_path = cert_path
        self.key_path = key_path

    @classmethod
    def create(cls, directory: str | Path, *, name: str = "autoglm broker CA", days: int = 3650,
               key_mode: int = 0o600) -> CertificateAuthority:
        """A new CA: ``ca.pem`` and ``ca.key`` (mode ``key_mode``) in ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_certificate(key, name, days)
        cert_path = _write(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        key_path = _write(d / "ca.key", _key_pem(key), key_mode)
        return cls(cert, key, cert_path, key_path)

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path) -> CertificateAuthority:
        """An existing CA from PEM files (the key unencrypted, EC)."""
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: the CA key must be an EC private key")
        return cls(cert, key, Path(cert_path), Path(key_path))

    def _write_pair(self, directory: Path, stem: str, key: ec.EllipticCurvePrivateKey,
                    cert: x509.Certificate, key_mode: int) -> CertFiles:
        directory.mkdir(parents=True, exist_ok=True)
        return CertFiles(
            cert=_write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644),
            key=_write(directory / f"{stem}.key", _key_pem(key), key_mode),
        )

    def issue_server(self, directory: str | Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                     days: int = 825, stem: str = "server", key_mode: int = 0o600) -> CertFiles:
        """A server certificate for ``hosts`` (first one as CN, all as subject alternative names)."""
        key, cert = _issue(self.key, self.cert.subject, hosts[0] if hosts else "localhost",
                           hosts=hosts, client=False, days=days)
        return self._write_pair(Path(directory), stem, key, cert, key_mode)

    def issue_for_did(self, did: str, directory: str | Path, *, days: int = 365,
                      not_after: dt.datetime | None = None, key_mode: int = 0o600) -> CertFiles:
        """A client certificate for ``did``: subject CN = its DID token (what Mosquitto's
        ``use_identity_as_username`` makes the username), the DID itself as a URI SAN.
        Files: ``<token>.pem`` and ``<token>.key`` in ``directory``."""
        token = client_token(did)
        key, cert = _issue(self.key, self.cert.subject, token, hosts=(), client=True, days=days,
                           uris=(did.partition("#")[0],), not_after=not_after)
        return self._write_pair(Path(directory), token, key, cert, key_mode)

    def issue_for_credential(self, credential: Mapping[str, Any], directory: str | Path, *,
                             key_mode: int = 0o600) -> CertFiles:
        """A client certificate for the subject of a DeviceCredential, expiring with it
        (``validUntil``; one year if the credential has none)."""
        subject = credential.get("credentialSubject")
        did = subject.get("id") if isinstance(subject, Mapping) else None
        if not isinstance(did, str) or not did.startswith("did:"):
            raise ValueError("credential has no credentialSubject.id DID")
        until = credential.get("validUntil")
        not_after = None
        if isinstance(until, str):
            not_after = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
            if not_after.tzinfo is None:
                not_after = not_after.replace(tzinfo=dt.UTC)
        return self.issue_for_did(did, directory, not_after=not_after, key_mode=key_mode)


def client_identity(cert_path: str | Path) -> str:
    """The subject CN of a PEM certificate (the username Mosquitto derives from it)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


def make_test_pki(
    directory: str | Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_cn: str = "autoglm-test-client",
    days: int = 2,
) -> PKIFiles:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key into ``directory``.

    Keys are mode 0644 so a broker that drops root privileges (mosquitto) can read them:
    this is test material, never production keys. ``CertificateAuthority.load(pki.ca,
    pki.ca_key)`` issues more certificates from it.
    """
    d = Path(directory)
    ca = CertificateAuthority.create(d, name="autoglm test CA", days=days, key_mode=0o644)
    server = ca.issue_server(d, hosts=hosts, days=days, key_mode=0o644)
    key, cert = _issue(ca.key, ca.cert.subject, client_cn, hosts=(), client=True, days=days)
    client = ca._write_pair(d, "client", key, cert, 0o644)  # noqa: SLF001 - same module
    return PKIFiles(ca=ca.cert_path, server=server, client=client, ca_key=ca.key_path)


__all__ = ["CertFiles", "PKIFiles", "CertificateAuthority", "client_identity", "make_test_pki"]
