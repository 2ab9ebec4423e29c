"""What a servicer sees of one call: grpcio's ``ServicerContext`` surface, for calls run by
``xdsd.transport``. Handlers written for ``grpc.aio`` run unchanged."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

if TYPE_CHECKING:
    from xdsd.transport.call import Call

# Headers that are gRPC's framing, not the caller's metadata (grpc hides them the same way).
RESERVED_HEADERS = frozenset({
    "content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "grpc-message-type",
})

# grpc-timeout units (gRPC over HTTP/2, "Requests": TimeoutValue TimeoutUnit).
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` header (at most 8 digits and a unit), None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _TIMEOUT_UNITS:
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def metadata_from(headers: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    """Caller metadata as grpcio presents it: ASCII values as str, ``-bin`` values decoded to bytes."""
    out: list[tuple[str, str | bytes]] = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("ascii", "replace")
        if key.startswith(":") or key in RESERVED_HEADERS:
            continue
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(raw_value + b"=" * (-len(raw_value) % 4))))
            except ValueError:
                continue
        else:
            out.append((key, raw_value.decode("latin-1")))
    return tuple(out)


def peer_string(peername: Any) -> str:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5``, the form grpcio's ``context.peer()`` gives."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{peername}" if peername else "unknown"


class ServicerContext:
    """The per-call context: metadata and peer in, status and messages out."""

    __slots__ = ("_call", "_metadata", "code", "details", "trailing_metadata")

    def __init__(self, call: Call, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._call = call
        self._metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._call.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.finished

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.trailing_metadata = tuple(metadata)

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._call.send_headers(metadata, now=True)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()) -> NoReturn:
        """End the call with this status (grpc.aio raises AbortError out of the handler too)."""
        self.code = code
        self.details = details
        if trailing_metadata:
            self.trailing_metadata = tuple(trailing_metadata)
        raise grpc.aio.AbortError(f"aborted: {code.name}")

    async def read(self) -> Any:
        return await self._call.read()

    async def write(self, message: Any) -> None:
        await self._call.write(message)
