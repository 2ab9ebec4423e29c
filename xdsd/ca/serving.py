"""The xDS port's own TLS certificate, issued by xdsd's CA and kept in the state directory.

``xdsd serve`` serves xDS (and the ext_authz HTTP port) over TLS by default with this certificate.
Its names: ``xdsd`` (the name ``xdsd bootstrap`` verifies by default), the machine's host name, the
``--xds-address`` host when it is not a wildcard, and every ``--xds-tls-san``. It is renewed when a
third of its life is left or its names change. ``xds-tls/ca.pem`` holds the bundle that verifies it,
which ``xdsd bootstrap`` embeds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from xdsd.ca.authority import CertificateAuthority

log = logging.getLogger(__name__)

SERVER_NAME = "xdsd"  # always among the certificate's names; what bootstraps verify by default
LIFETIME = dt.timedelta(days=90)
TLS_DIR = "xds-tls"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def serving_names(xds_host: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) for the certificate, in a stable order."""
    dns: list[str] = [SERVER_NAME]
    ips: list[str] = []
    candidates = [socket.gethostname()]
    if xds_host not in ("", "0.0.0.0", "::", "[::]"):
        candidates.append(xds_host)
    candidates += list(extra)
    for name in candidates:
        name = name.strip().strip("[]").lower()
        if not name:
            continue
        if _is_ip(name):
            if name not in ips:
                ips.append(name)
        elif name not in dns:
            dns.append(name)
    return dns, ips


def bundle_path(state_dir: Path) -> Path:
    return state_dir / TLS_DIR / "ca.pem"


@dataclass(frozen=True, slots=True)
class ServingFiles:
    cert: Path
    key: Path
    bundle: Path
    not_after: dt.datetime


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _names_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def ensure_serving_certificate(ca: CertificateAuthority, state_dir: Path, dns: list[str], ips: list[str],
                               now: dt.datetime | None = None) -> tuple[ServingFiles, bool]:
    """The serving certificate in ``state_dir/xds-tls``: the existing one if it was issued by ``ca``,
    carries exactly these names and has more than a third of its life left; else a new one.
    Returns the files and whether a new certificate was issued."""
    now = now or dt.datetime.now(dt.UTC)
    directory = state_dir / TLS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, bundle = directory / "cert.pem", directory / "key.pem", bundle_path(state_dir)
    ca_bundle = ca.bundle_pem
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        cert = chain[0]
        fresh = (
            key_path.exists()
            and cert.issuer == ca.signing_cert.subject
            and _names_of(cert) == (set(dns), set(ips))
            and cert.not_valid_after_utc - now > (cert.not_valid_after_utc - cert.not_valid_before_utc) / 3
            and bundle.exists() and bundle.read_bytes() == ca_bundle
        )
        if fresh:
            cert.verify_directly_issued_by(ca.signing_cert)
            return ServingFiles(cert_path, key_path, bundle, cert.not_valid_after_utc), False
    except Exception:  # noqa: BLE001 - missing, unreadable, or not signed by this CA: issue a new one
        pass
    chain_pem, key_pem = ca.issue_server(dns, ips, LIFETIME, now)
    _write(key_path, key_pem, 0o600)
    _write(cert_path, chain_pem, 0o644)
    _write(bundle, ca_bundle, 0o644)
    not_after = x509.load_pem_x509_certificate(chain_pem).not_valid_after_utc
    log.info("issued xDS serving certificate for %s (valid until %s)", ", ".join(dns + ips), not_after.isoformat())
    return ServingFiles(cert_path, key_path, bundle, not_after), True


def renew_at(files: ServingFiles) -> dt.datetime:
    """When the certificate has a third of its life left."""
    return files.not_after - LIFETIME / 3
