"""Which identities exist, their current SVIDs, and when each must be rotated."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from xdsd.ca.authority import CertificateAuthority, Svid

log = logging.getLogger(__name__)


def service_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/service/{service}"


def gateway_id(trust_domain: str, gateway: str) -> str:
    return f"spiffe://{trust_domain}/gateway/{gateway}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the secret generator may hand out: the trust bundle and the current SVID per identity."""

    trust_domain: str = ""
    bundle_pem: bytes = b""
    svids: Mapping[str, Svid] = field(default_factory=lambda: MappingProxyType({}))


class IdentityStore:
    def __init__(self, ca: CertificateAuthority, lifetime: dt.timedelta, *, aligned: bool = False) -> None:
        self.ca = ca
        self.lifetime = lifetime
        self.aligned = aligned  # replicas: every replica issues the same SVIDs (CertificateAuthority.issue)
        self._svids: dict[str, Svid] = {}
        self.trust_domain = ""
        self.credentials = Credentials()

    def ensure(self, trust_domain: str, spiffe_ids: set[str], lifetime: dt.timedelta | None = None) -> bool:
        """Issue SVIDs for new identities and drop those no longer in the mesh. True if anything changed."""
        changed = False
        if lifetime is not None and lifetime != self.lifetime:
            self.lifetime = lifetime
            self._svids.clear()  # reissue everything with the new lifetime
            changed = True
        if trust_domain != self.trust_domain:
            self.trust_domain = trust_domain
            changed = True
        for gone in set(self._svids) - spiffe_ids:
            del self._svids[gone]
            changed = True
        for sid in spiffe_ids - set(self._svids):
            self._svids[sid] = self.ca.issue(sid, self.lifetime, aligned=self.aligned)
            changed = True
        if changed:
            self._publish()
        return changed

    def rotate_due(self, now: dt.datetime | None = None) -> list[str]:
        """Reissue every SVID past its half-life; returns the rotated identities."""
        now = now or dt.datetime.now(dt.UTC)
        due = [sid for sid, svid in self._svids.items() if svid.rotate_at <= now]
        for sid in due:
            self._svids[sid] = self.ca.issue(sid, self.lifetime, now, aligned=self.aligned)
        if due:
            self._publish()
        return due

    async def rotate_forever(self, stop: asyncio.Event, on_rotated: Callable[[], None]) -> None:
        """Reissue each SVID at half its life, then call ``on_rotated`` (which pushes the secrets)."""
        while not stop.is_set():
            due = self.next_rotation()
            wait = 1.0 if due is None else (due - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(wait, 5.0))
                continue
            rotated = self.rotate_due()
            if rotated:
                log.debug("rotated %d SVIDs", len(rotated))
                on_rotated()

    def next_rotation(self) -> dt.datetime | None:
        return min((s.rotate_at for s in self._svids.values()), default=None)

    def _publish(self) -> None:
        self.credentials = Credentials(self.trust_domain, self.ca.bundle_pem, MappingProxyType(dict(self._svids)))
