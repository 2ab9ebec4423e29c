"""Identity: the built-in CA and the SVIDs it issues and rotates."""

from __future__ import annotations

from xdsd.ca.authority import CertificateAuthority, Svid
from xdsd.ca.identities import Credentials, IdentityStore, gateway_id, service_id

__all__ = ["CertificateAuthority", "Credentials", "IdentityStore", "Svid", "gateway_id", "service_id"]
