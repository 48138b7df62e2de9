"""TLS credentials for one live migration: a certificate authority made for it alone, the
target's server certificate and the source's client certificate, both signed by it.

Why per migration: the migration stream carries the guest's RAM into a hypervisor running as
root, so its listener must accept only the source it waits for. The target verifies the
client's certificate against this migration's CA (``verify-peer``) and the source checks the
server's name against :data:`SERVER_NAME`; the CA's key is dropped once both are signed, so
nothing signs another. The keys travel only inside the coordinator's Ray calls (never on a
command line or in an environment) and are written, 0600 in a 0700 directory, only for the
moment the hypervisor reads them (:func:`written`).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, SecretStr

from .staging import remove_tree

SERVER_NAME = "cedana-ray-migration-target"  # the name in the target's certificate, which the source checks
LIFETIME = datetime.timedelta(hours=1)  # a migration that has not begun by then needs new ones
SKEW = datetime.timedelta(minutes=5)  # clocks of two nodes may differ a little


class TlsFiles(BaseModel):
    """One side's credentials, as QEMU's ``tls-creds-x509`` reads them from a directory."""

    model_config = ConfigDict(frozen=True)

    endpoint: Literal["server", "client"]
    ca: str  # PEM: the migration's CA certificate
    cert: str  # PEM: this side's certificate
    key: SecretStr  # PEM: its private key

    def files(self) -> dict[str, str]:
        """File name -> content, named as QEMU (gnutls) expects them."""
        key = self.key.get_secret_value()
        return {"ca-cert.pem": self.ca, f"{self.endpoint}-cert.pem": self.cert, f"{self.endpoint}-key.pem": key}


@contextmanager
def written(creds: TlsFiles) -> Iterator[Path]:
    """``creds`` in a new private directory (0700, files 0600), removed on leaving: the
    hypervisor reads them once, when its credentials object is made."""
    folder = Path(tempfile.mkdtemp(prefix="cedana-ray-tls-"))  # 0700
    try:
        for name, text in creds.files().items():
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        yield folder
    finally:
        remove_tree(folder)


def credentials() -> tuple[TlsFiles, TlsFiles]:
    """A new CA, and the (server, client) credentials it signed; its own key is not kept."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = _name("cedana-ray migration CA")
    ca = _builder(name, name, ca_key, now).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    ca_cert = ca.add_extension(_usage(cert_sign=True), critical=True).sign(ca_key, hashes.SHA256())
    server = _leaf(ca_cert, ca_key, now, "server")
    client = _leaf(ca_cert, ca_key, now, "client")
    return server, client


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: datetime.datetime, endpoint: str) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    server = endpoint == "server"
    builder = _builder(_name(SERVER_NAME if server else "cedana-ray-migration-source"), ca.subject, key, now)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(_usage(cert_sign=False), critical=True)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return TlsFiles(endpoint=endpoint, ca=_pem(ca), cert=_pem(cert), key=SecretStr(pem.decode()))  # type: ignore[arg-type]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + LIFETIME)
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
