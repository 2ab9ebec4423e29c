"""Certificates for tests: an SVID from a CA (to talk to a sidecar as some identity), an operator's
own TLS certificate for xdsd's xDS port, and an operator's CA (root and intermediate) for
``xdsd serve --ca-cert/--ca-key/--ca-bundle``."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from xdsd.ca import CertificateAuthority


def write_svid(ca: CertificateAuthority, spiffe_id: str, where: Path, stem: str = "svid") -> tuple[Path, Path]:
    """An SVID for ``spiffe_id`` from ``ca`` (5 minutes), written to ``where``: (cert chain, key)."""
    where.mkdir(parents=True, exist_ok=True)
    svid = ca.issue(spiffe_id, dt.timedelta(minutes=5))
    cert, key = where / f"{stem}.pem", where / f"{stem}.key"
    cert.write_bytes(svid.cert_chain_pem)
    key.write_bytes(svid.key_pem)
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def server_cert(where: Path) -> tuple[Path, Path, Path]:
    """A TLS server certificate for 127.0.0.1 (and the name ``xdsd``) from a throwaway CA:
    (cert, key, the CA bundle that verifies it), all under ``where``."""
    ca = CertificateAuthority.load_or_create(where / "xds-ca", "xds")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdsd")]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca.signing_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path, bundle = where / "xds.pem", where / "xds.key", where / "ca.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    bundle.write_bytes(ca.bundle_pem)
    return cert_path, key_path, bundle


@dataclass(frozen=True)
class OperatorCa:
    """An operator's root (a trust anchor only) and the intermediate that signs for xdsd."""

    root: x509.Certificate
    intermediate: x509.Certificate
    cert_chain: Path  # the intermediate, then its chain (without the root): --ca-cert
    key: Path  # the intermediate's key: --ca-key
    bundle: Path  # the root: --ca-bundle

    def serve_args(self) -> list[str]:
        return ["--ca-cert", str(self.cert_chain), "--ca-key", str(self.key), "--ca-bundle", str(self.bundle)]


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             issuer_key: ec.EllipticCurvePrivateKey | None, path_length: int | None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "operator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key or key, hashes.SHA256())
    )


def operator_ca(where: Path) -> OperatorCa:
    """A root CA and an intermediate under it, written to ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("operator root", root_key, None, None, 1)
    inter = _ca_cert("operator intermediate", inter_key, root.subject, root_key, 0)
    chain, key, bundle = where / "intermediate.pem", where / "intermediate.key", where / "root.pem"
    chain.write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(_key_pem(inter_key))
    bundle.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return OperatorCa(root, inter, chain, key, bundle)
