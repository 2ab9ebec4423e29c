"""Tokens: HMAC-signed claims that say who a caller is, until when.

A **node token** binds a node id to the service (or gateway) it serves; ``xdsd bootstrap`` embeds
one in the Envoy bootstrap, and Envoy sends it (gRPC metadata / HTTP header ``x-xdsd-token``) on
every xDS stream and every ext_authz check. An **operator token** is for people and tools: CSDS,
the debug pages off loopback, ``xdsd status``.

Format: ``v2.<payload>.<mac>``; the payload is base64url JSON (token id, signing key id, kind, node,
cluster, issued at, expires at), the MAC is HMAC-SHA256 of ``v2.<payload>`` under the key the payload
names. Every token expires; a token can be revoked by its id or by its node id (``ledger``).
Signing keys rotate: tokens of every key in the keyring verify until that key is retired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_HEADER = "x-xdsd-token"
NODE = "node"
OPERATOR = "operator"
KINDS = (NODE, OPERATOR)
DEFAULT_TTL = 365 * 86400.0
# Far longer than any token xdsd mints (~300 bytes); anything longer is not ours.
MAX_TOKEN_LENGTH = 2048
_VERSION = "v2"
KEY_FILE = "token.key"  # the current signing key, in the state directory
PREVIOUS_KEYS_DIR = "token-keys"  # keys rotated out, still accepted until retired: <kid>.key


class TokenError(Exception):
    """The token is not valid; the message says why and is safe to show to the caller."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> str:
    """A signing key's id: derived from the key, so it needs no storage and never collides."""
    return hashlib.sha256(b"xdsd-token-key:" + key).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Claims:
    token_id: str
    kind: str  # NODE or OPERATOR
    node_id: str  # "" for operator tokens
    cluster: str  # "" for operator tokens
    issued_at: float  # unix time
    expires_at: float
    key_id: str

    def as_json(self) -> dict[str, object]:
        return {"id": self.token_id, "kind": self.kind, "node_id": self.node_id, "cluster": self.cluster,
                "issued_at": self.issued_at, "expires_at": self.expires_at, "key_id": self.key_id}


def _write_new_key(path: Path) -> bytes:
    """A fresh random key at ``path`` (mode 0600); the first writer wins against a concurrent one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    key = secrets.token_bytes(32)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()


class Keyring:
    """The signing keys: the current one (signs) and those rotated out (still verify)."""

    def __init__(self, current: bytes, previous: list[bytes] | None = None) -> None:
        if len(current) < 32:
            raise ValueError("a token key must be at least 32 bytes")
        self.current = current
        self.current_id = key_id(current)
        self.keys = {key_id(k): k for k in (previous or []) if len(k) >= 32}
        self.keys[self.current_id] = current

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Keyring:
        path = state_dir / KEY_FILE
        current = path.read_bytes() if path.exists() else _write_new_key(path)
        previous_dir = state_dir / PREVIOUS_KEYS_DIR
        previous = [p.read_bytes() for p in sorted(previous_dir.glob("*.key"))] if previous_dir.is_dir() else []
        return cls(current, previous)

    @staticmethod
    def rotate(state_dir: Path) -> tuple[str, str]:
        """Start a new signing key; the current one is kept as a previous key (it still verifies).
        Returns (old key id, new key id)."""
        ring = Keyring.load_or_create(state_dir)
        previous_dir = state_dir / PREVIOUS_KEYS_DIR
        previous_dir.mkdir(parents=True, exist_ok=True)
        kept = previous_dir / f"{ring.current_id}.key"
        fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ring.current)
        tmp = state_dir / f".{KEY_FILE}.rotate{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        new = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(new)
        os.replace(tmp, state_dir / KEY_FILE)
        return ring.current_id, key_id(new)

    @staticmethod
    def retire(state_dir: Path, kid: str | None = None) -> list[str]:
        """Stop accepting tokens of previous keys (all of them, or the one with id ``kid``)."""
        previous_dir = state_dir / PREVIOUS_KEYS_DIR
        if not previous_dir.is_dir():
            return []
        retired = []
        for path in sorted(previous_dir.glob("*.key")):
            if kid is None or path.stem == kid:
                path.unlink()
                retired.append(path.stem)
        return retired


class TokenSigner:
    """Issues and verifies tokens with a keyring."""

    def __init__(self, keys: bytes | Keyring) -> None:
        self.keyring = keys if isinstance(keys, Keyring) else Keyring(keys)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> TokenSigner:
        """The keys in ``state_dir`` (the current key is created on first use, mode 0600)."""
        return cls(Keyring.load_or_create(state_dir))

    def mint(self, node_id: str, cluster: str, *, kind: str = NODE, ttl: float = DEFAULT_TTL,
             now: float | None = None) -> tuple[str, Claims]:
        if kind not in KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        if not ttl > 0:
            raise ValueError("a token's ttl must be greater than zero")
        issued = round(time.time() if now is None else now, 3)
        claims = Claims(secrets.token_hex(8), kind, node_id if kind == NODE else "",
                        cluster if kind == NODE else "", issued, round(issued + ttl, 3), self.keyring.current_id)
        payload = _b64(json.dumps({
            "jti": claims.token_id, "kid": claims.key_id, "typ": kind, "node": claims.node_id,
            "cluster": claims.cluster, "iat": claims.issued_at, "exp": claims.expires_at,
        }, separators=(",", ":")).encode())
        return f"{_VERSION}.{payload}.{self._mac(self.keyring.current, payload)}", claims

    def issue(self, node_id: str, cluster: str, *, kind: str = NODE, ttl: float = DEFAULT_TTL,
              now: float | None = None) -> str:
        return self.mint(node_id, cluster, kind=kind, ttl=ttl, now=now)[0]

    def operator(self, *, ttl: float = DEFAULT_TTL, now: float | None = None) -> str:
        return self.issue("", "", kind=OPERATOR, ttl=ttl, now=now)

    @staticmethod
    def _mac(key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, f"{_VERSION}.{payload}".encode(), hashlib.sha256).digest())

    def verify(self, token: object, now: float | None = None) -> Claims:
        """The claims of a genuine, unexpired token; TokenError for anything else (whatever the
        caller sent: any type, any bytes, any length)."""
        if not isinstance(token, str) or not token:
            raise TokenError("no token")
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenError("malformed token")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("malformed token")
        version, payload, mac = parts
        if version == "v1":
            raise TokenError("token format v1 is no longer accepted (it could not expire or be revoked): "
                             "issue a new one with `xdsd token` / `xdsd bootstrap`")
        if version != _VERSION:
            raise TokenError("unknown token version")
        try:
            data = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            raise TokenError("malformed token") from None
        if not isinstance(data, dict):
            raise TokenError("malformed token")
        key = self.keyring.keys.get(data.get("kid")) if isinstance(data.get("kid"), str) else None
        if key is None:
            raise TokenError("token signed with an unknown or retired key")
        if not hmac.compare_digest(mac.encode(), self._mac(key, payload).encode()):
            raise TokenError("bad token signature")
        try:
            claims = Claims(_text(data["jti"]), _text(data["typ"]), _text(data["node"]), _text(data["cluster"]),
                            _number(data["iat"]), _number(data["exp"]), _text(data["kid"]))
        except (KeyError, TypeError):
            raise TokenError("malformed token claims") from None
        if claims.kind not in KINDS:
            raise TokenError("unknown token kind")
        if claims.expires_at <= (time.time() if now is None else now):
            raise TokenError(f"token expired at {format_time(claims.expires_at)}")
        return claims


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    return float(value)


def format_time(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def parse_ttl(text: str) -> float:
    """``365d``, ``12h``, ``30m``, ``90s`` or plain seconds -> seconds (> 0)."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    value = text.strip()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"expected a duration such as 365d, 12h, 30m or 90s, got {text!r}") from None
    if not 0 < seconds <= 100 * 365 * 86400:
        raise ValueError(f"must be greater than 0 and at most 100 years, got {text!r}")
    return seconds
