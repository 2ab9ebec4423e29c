"""The built-in certificate authority: a root kept in the state directory (or an operator's
root/intermediate), and short-lived X.509 SVIDs for mesh identities.

An SVID has exactly one URI SAN (``spiffe://<trust-domain>/service/<name>``), is not a CA, may
only sign (digitalSignature), and serves TLS in both directions (clientAuth and serverAuth).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Certificates are valid from a little before they are issued, so that a peer whose clock is
# slightly behind still accepts them; never more than a quarter of the lifetime.
MAX_BACKDATE = dt.timedelta(seconds=60)
ROOT_LIFETIME = dt.timedelta(days=3650)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Svid:
    """One issued identity: the leaf chain and key in PEM, and when it should be rotated."""

    spiffe_id: str
    cert_chain_pem: bytes  # leaf first, then any intermediates (never the root)
    key_pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime
    rotate_after: dt.datetime | None = None  # aligned SVIDs: the end of their issuing period

    @property
    def rotate_at(self) -> dt.datetime:
        """Half-life: a fresh SVID is pushed while the current one has half its life left."""
        if self.rotate_after is not None:
            return self.rotate_after
        return self.issued_at + (self.not_after - self.issued_at) / 2


class CertificateAuthority:
    def __init__(self, signing_cert: x509.Certificate, signing_key: ec.EllipticCurvePrivateKey | object,
                 chain: list[x509.Certificate], bundle: list[x509.Certificate]) -> None:
        self.signing_cert = signing_cert
        self.signing_key = signing_key
        self.chain = chain  # intermediates to send with leaves (signing cert first if not a root)
        self.bundle = bundle  # trust anchors, served as the validation context

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.bundle)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> CertificateAuthority:
        """The root in ``state_dir/ca`` (created on first start, private key mode 0600)."""
        ca_dir = state_dir / "ca"
        cert_path, key_path = ca_dir / "root.pem", ca_dir / "root.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            return cls(cert, key, [], [cert])
        ca_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xdsd"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"xdsd root CA for {trust_domain}"),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - MAX_BACKDATE)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        tmp = key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        os.replace(tmp, key_path)
        cert_path.write_bytes(_pem(cert))
        return cls(cert, key, [], [cert])

    @classmethod
    def from_files(cls, cert_file: Path, key_file: Path, bundle_file: Path | None = None) -> CertificateAuthority:
        """An operator's CA: ``cert_file`` holds the signing certificate, optionally followed by the
        chain up to (not necessarily including) the root; ``bundle_file`` the trust anchors (default:
        the self-signed certificates of ``cert_file``)."""
        certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        signing = certs[0]
        if signing.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError(f"{key_file} is not the key of the first certificate in {cert_file}")
        roots = [c for c in certs if c.issuer == c.subject]
        chain = [c for c in certs if c.issuer != c.subject]
        bundle = x509.load_pem_x509_certificates(bundle_file.read_bytes()) if bundle_file else roots
        if not bundle:
            raise ValueError("no trust anchors: give --ca-bundle or include the root in --ca-cert")
        return cls(signing, key, chain, bundle)

    # -- issuing --------------------------------------------------------------------------

    def issue_server(self, dns_names: list[str], ips: list[str], lifetime: dt.timedelta,
                     now: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """A TLS serving certificate for xdsd's own ports (serverAuth only, never a client or a CA):
        (certificate chain PEM, private key PEM)."""
        import ipaddress

        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xdsd"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else "xdsd")]))
            .issuer_name(self.signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - MAX_BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(self.signing_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return _pem(cert) + b"".join(_pem(c) for c in self.chain), key_pem

    def _derived(self, spiffe_id: str, lifetime: dt.timedelta, epoch: int, what: bytes) -> bytes:
        """Bytes only a holder of this CA's key can compute, the same in every replica."""
        secret = self.signing_key.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        key = hashlib.sha256(b"xdsd-svid-derivation:" + secret).digest()
        msg = f"{spiffe_id}\n{lifetime.total_seconds()}\n{epoch}\n".encode() + what
        return hmac.new(key, msg, hashlib.sha256).digest()

    def issue(self, spiffe_id: str, lifetime: dt.timedelta, now: dt.datetime | None = None, *,
              aligned: bool = False) -> Svid:
        """A fresh SVID. ``aligned`` (replicas sharing one CA): issued at the start of the current
        half-lifetime period, with a key, serial and signature derived from the CA key, the identity
        and the period, so every replica issues byte-identical SVIDs (the same SDS versions: an Envoy
        moving between replicas gets no new secret) and rotates them at the same moment."""
        now = now or _now()
        backdate = min(MAX_BACKDATE, lifetime / 4)
        rotate_after = None
        if aligned:
            # Periods of half the lifetime, in whole milliseconds since the epoch: exact arithmetic.
            step = max(1, int(lifetime.total_seconds() * 1000) // 2)
            epoch = int(now.timestamp() * 1000) // step
            now = dt.datetime.fromtimestamp(epoch * step / 1000, dt.UTC)
            rotate_after = dt.datetime.fromtimestamp((epoch + 1) * step / 1000, dt.UTC)
            order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256
            scalar = int.from_bytes(self._derived(spiffe_id, lifetime, epoch, b"key") * 2, "big") % (order - 1) + 1
            key = ec.derive_private_key(scalar, ec.SECP256R1())
            serial = (int.from_bytes(self._derived(spiffe_id, lifetime, epoch, b"serial")[:19], "big") >> 1) | 1
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            serial = x509.random_serial_number()
        not_before = (now - backdate).replace(microsecond=0)
        not_after = now + lifetime
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xdsd")]))
            .issuer_name(self.signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            # SPIFFE X.509-SVID: exactly one URI SAN, the SPIFFE ID; critical since the subject is empty of names.
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signing_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        deterministic = aligned and isinstance(self.signing_key, ec.EllipticCurvePrivateKey)
        cert = builder.sign(self.signing_key, hashes.SHA256(),  # type: ignore[arg-type]
                            ecdsa_deterministic=True if deterministic else None)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain_pem = _pem(cert) + b"".join(_pem(c) for c in self.chain)
        return Svid(spiffe_id, chain_pem, key_pem, serial, not_before, cert.not_valid_after_utc, now, rotate_after)
