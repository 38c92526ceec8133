"""Throw-away X.509 material for TLS listeners: a CA plus server/client certificates (cryptography)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_test_pki(
    directory: str | Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_cn: str = "autoglm-test-client",
    days: int = 2,
) -> PKIFiles:
    """Write ca.pem, server.pem/server.key, client.pem/client.key into ``directory``.

    Keys are mode 0644 so a broker that drops root privileges (mosquitto) can read them:
    this is test material, never production keys.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("autoglm test CA")
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert = (
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
    pem = serialization.Encoding.PEM
    ca_path = _write(d / "ca.pem", ca_cert.public_bytes(pem), 0o644)
    files = {}
    for label, cn, is_client, sans in (("server", hosts[0] if hosts else "localhost", False, hosts),
                                       ("client", client_cn, True, ())):
        key, cert = _issue(ca_key, ca_name, cn, hosts=sans, client=is_client, days=days)
        files[label] = CertFiles(
            cert=_write(d / f"{label}.pem", cert.public_bytes(pem), 0o644),
            key=_write(d / f"{label}.key", _key_pem(key), 0o644),
        )
    return PKIFiles(ca=ca_path, server=files["server"], client=files["client"])


__all__ = ["CertFiles", "PKIFiles", "make_test_pki"]
