"""Node tokens: an HMAC-signed claim binding a node id to the service (or gateway) it serves.

``xdsd bootstrap`` embeds one in the Envoy bootstrap; Envoy sends it as gRPC initial metadata
(``x-xdsd-token``) on every xDS stream. A stream whose token is missing, forged, or names
another node or service gets PERMISSION_DENIED and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_HEADER = "x-xdsd-token"


class TokenError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Claims:
    node_id: str
    cluster: str
    issued_at: int


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("token key must be at least 32 bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> TokenSigner:
        """The signing key in ``state_dir/token.key`` (created on first use, mode 0600)."""
        path = state_dir / "token.key"
        if not path.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # first writer wins; a concurrent creator keeps the same key
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        return cls(path.read_bytes())

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, node_id: str, cluster: str) -> str:
        payload = _b64(json.dumps({"node": node_id, "cluster": cluster, "iat": int(time.time())},
                                  separators=(",", ":")).encode())
        return f"v1.{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> Claims:
        try:
            version, payload, mac = token.split(".")
        except ValueError:
            raise TokenError("malformed token") from None
        if version != "v1":
            raise TokenError("unknown token version")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError("bad token signature")
        try:
            data = json.loads(_unb64(payload))
            return Claims(str(data["node"]), str(data["cluster"]), int(data["iat"]))
        except (ValueError, KeyError, TypeError):
            raise TokenError("malformed token claims") from None
