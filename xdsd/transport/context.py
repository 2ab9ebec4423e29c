"""What a servicer sees of one call: grpcio's ``ServicerContext`` surface, for calls run by
``xdsd.transport``. Handlers written for ``grpc.aio`` run unchanged."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

if TYPE_CHECKING:
    from xdsd.transport.call import Call

log = logging.getLogger(__name__)

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

    __slots__ = ("_call", "_metadata", "_code", "_details", "_trailing", "_done_callbacks")

    def __init__(self, call: Call, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._call = call
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._done_callbacks: list[Callable[[ServicerContext], None]] = []

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._call.peer

    def peer_identities(self) -> None:
        return None  # no client certificates on this port

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.finished or self._call.cancelled

    def add_done_callback(self, callback: Callable[[ServicerContext], None]) -> None:
        self._done_callbacks.append(callback)

    def run_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a done callback of a gRPC call failed")

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._trailing = tuple(metadata)

    def set_compression(self, compression: grpc.Compression) -> None:
        """Responses are never compressed here (grpc-accept-encoding: identity); accepted and ignored."""

    def disable_next_message_compression(self) -> None:
        """Nothing is compressed; nothing to disable."""

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._call.send_headers(metadata, now=True)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()) -> NoReturn:
        """End the call with this status (grpc.aio raises AbortError out of the handler too)."""
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError(f"aborted: {code.name}")

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, tuple(status.trailing_metadata or ()))

    async def read(self) -> Any:
        return await self._call.read()

    async def write(self, message: Any) -> None:
        await self._call.write(message)
