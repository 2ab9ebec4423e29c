"""Who is calling, and may they: one place that turns a presented token into a ``Caller`` or a
``Denied``, for every surface (xDS streams, ext_authz over gRPC and HTTP, registration, CSDS, the
admin pages). A token is refused when it is missing, malformed, forged, signed with a retired key,
expired, revoked, or of the wrong kind for the surface."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xdsd.auth import ledger
from xdsd.auth.tokens import NODE, OPERATOR, TOKEN_HEADER, Claims, TokenError, TokenSigner

log = logging.getLogger(__name__)

# Verified tokens remembered (the signature check and JSON parse are skipped for a token seen
# before; expiry and revocation are checked on every use). Bounded: cleared when full.
_VERIFIED_CACHE = 4096


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller (or, with authentication off, an anonymous one)."""

    kind: str  # NODE, OPERATOR, or "anonymous" (``--auth off``)
    node_id: str = ""
    cluster: str = ""
    token_id: str = ""
    issued_at: float = 0.0
    expires_at: float = float("inf")
    key_id: str = ""

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"


ANONYMOUS = Caller("anonymous")


class Denied(Exception):
    """Refused. ``reason`` is a short label (metrics, /debug/refused); ``unauthenticated`` tells a
    caller without valid credentials (gRPC UNAUTHENTICATED, HTTP 401) from one whose valid
    credentials do not allow this (PERMISSION_DENIED, 403)."""

    def __init__(self, reason: str, message: str, *, unauthenticated: bool = True) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.unauthenticated = unauthenticated


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """``x-xdsd-token``, else ``Authorization: Bearer <token>`` (header names lower case)."""
    token = headers.get(TOKEN_HEADER)
    if token is None:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
    return token


def token_from_metadata(metadata: object) -> str | None:
    """The token in gRPC invocation metadata (a sequence of (key, value) pairs)."""
    for item in metadata or ():  # type: ignore[attr-defined]
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if key == TOKEN_HEADER:
            return value if isinstance(value, str) else None
    return None


class Access:
    """Checks tokens against the signing keys and the revocation list of a state directory.

    ``required=False`` (``xdsd serve --auth off``) lets everyone in as an anonymous caller."""

    def __init__(self, signer: TokenSigner | None, revocations: ledger.Revocations | None = None,
                 *, required: bool = True, state_dir: Path | None = None) -> None:
        self.signer = signer
        self.required = required and signer is not None
        self.revocations = revocations or ledger.Revocations()
        self.state_dir = state_dir
        self._fingerprint = ledger.fingerprint(state_dir) if state_dir is not None else None
        self._verified: dict[str, Claims] = {}

    @classmethod
    def from_state_dir(cls, state_dir: Path, *, required: bool = True) -> Access:
        return cls(TokenSigner.load_or_create(state_dir), ledger.Revocations.load(state_dir),
                   required=required, state_dir=state_dir)

    @classmethod
    def off(cls) -> Access:
        return cls(None, required=False)

    # -- keeping up with the state directory -----------------------------------------------

    def refresh(self) -> bool:
        """Re-read keys and revocations if their files changed. True if anything did."""
        if self.state_dir is None:
            return False
        fp = ledger.fingerprint(self.state_dir)
        if fp == self._fingerprint:
            return False
        self._fingerprint = fp
        self.revocations = ledger.Revocations.load(self.state_dir)
        if self.signer is not None:
            self.signer = TokenSigner.load_or_create(self.state_dir)
        self._verified.clear()
        log.info("token keys or revocations changed: %d token ids, %d node ids revoked",
                 len(self.revocations.ids), len(self.revocations.nodes))
        return True

    # -- checks ---------------------------------------------------------------------------

    def claims(self, token: str | None, now: float | None = None) -> Claims:
        """The claims of a valid token (genuine, unexpired, not revoked), else Denied."""
        if not token:
            raise Denied("missing-token", f"send a token in {TOKEN_HEADER}")
        assert self.signer is not None
        claims = self._verified.get(token)
        now = time.time() if now is None else now
        if claims is None:
            try:
                claims = self.signer.verify(token, now)
            except TokenError as exc:
                text = str(exc)
                raise Denied("expired" if text.startswith("token expired") else "bad-token", text) from None
            if len(self._verified) >= _VERIFIED_CACHE:
                self._verified.clear()
            self._verified[token] = claims
        elif claims.expires_at <= now:
            raise Denied("expired", f"token expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claims.expires_at))}")
        why = self.revocations.revoked(claims.token_id, claims.node_id, claims.issued_at)
        if why is not None:
            raise Denied("revoked", why)
        return claims

    def caller(self, token: str | None) -> Caller:
        """Any valid token (node or operator)."""
        if not self.required:
            return ANONYMOUS
        c = self.claims(token)
        return Caller(c.kind, c.node_id, c.cluster, c.token_id, c.issued_at, c.expires_at, c.key_id)

    def node(self, token: str | None, node_id: str, cluster: str) -> Caller:
        """A node token for exactly this node id and service (xDS streams)."""
        caller = self.caller(token)
        if caller.anonymous:
            return caller
        if caller.kind != NODE:
            raise Denied("not-a-node", "an operator token cannot open xDS streams", unauthenticated=False)
        if caller.node_id != node_id:
            raise Denied("wrong-node", f"node {node_id!r} presented a token for node {caller.node_id!r}",
                         unauthenticated=False)
        if caller.cluster != cluster:
            raise Denied("wrong-cluster", f"node {node_id!r} claims {cluster!r} but its token is for "
                         f"{caller.cluster!r}", unauthenticated=False)
        return caller

    def service(self, token: str | None, service: str) -> Caller:
        """A node token issued for ``service`` (any node of it): registration, ext_authz checks
        about ``service`` (a sidecar asks about its own service, a gateway about itself)."""
        caller = self.caller(token)
        if caller.anonymous:
            return caller
        if caller.kind != NODE:
            raise Denied("not-a-node", "this needs a node token, not an operator token", unauthenticated=False)
        if caller.cluster != service:
            raise Denied("wrong-cluster", f"the token is for {caller.cluster!r}, not {service!r}",
                         unauthenticated=False)
        return caller

    def operator(self, token: str | None) -> Caller:
        caller = self.caller(token)
        if caller.anonymous:
            return caller
        if caller.kind != OPERATOR:
            raise Denied("not-operator", "this needs an operator token (`xdsd token --operator`)",
                         unauthenticated=False)
        return caller

    def still_valid(self, caller: Caller, now: float | None = None) -> Denied | None:
        """For a caller admitted earlier (a long-lived stream): revoked or expired since?"""
        if caller.anonymous:
            return None
        now = time.time() if now is None else now
        if caller.expires_at <= now:
            return Denied("expired", "the stream's token expired")
        if self.signer is not None and caller.key_id not in self.signer.keyring.keys:
            return Denied("bad-token", "the stream's token was signed with a retired key")
        why = self.revocations.revoked(caller.token_id, caller.node_id, caller.issued_at)
        return None if why is None else Denied("revoked", why)
