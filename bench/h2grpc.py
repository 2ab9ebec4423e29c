"""A minimal gRPC client for one bidirectional stream per HTTP/2 connection, on the ``h2`` library.

The load generator (bench.loadgen) runs up to thousands of sidecar-like ADS streams in one process,
and every fan-out delivers one message to each of them, on a 2-core machine shared with the xdsd
process being measured. With grpc.aio channels one fan-out to 1,000 streams cost the worker ~190 ms
of CPU; this client does it in ~90 ms. It is an ``asyncio.Protocol`` driving an h2 connection state
machine: DATA frames become complete gRPC messages in ``data_received``, and a message out is one
``send_data`` and one ``transport.write``. What remains is mostly h2's frame handling and the
socket calls (grpcio's server answers each small request with two WINDOW_UPDATEs and often a PING,
which this side has to parse and, for the PING, answer).

    stream = await open_stream("127.0.0.1", 18000, "/pkg.Service/Method", (("x-token", "t"),))
    stream.write(request_bytes)            # gRPC-framed; buffered while the peer's window is short
    async for message in stream:           # complete messages; H2GrpcError if the status is not OK
        ...
    stream.close()

HTTP/2 with prior knowledge (cleartext), no compression, one stream per connection, one reader at a
time (``read`` parks a single future). The receive windows (stream and connection) are 16 MiB, so a
large response (an EDS assignment can be 270 KB) never waits for a WINDOW_UPDATE round trip;
consumed data is acknowledged as it is parsed.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Iterable
from typing import cast
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

WINDOW = 16 * 1024 * 1024
_DEFAULT_WINDOW = 65535

# grpc.StatusCode names by number (this module does not import grpc).
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
OK, CANCELLED, UNKNOWN, INTERNAL, UNAVAILABLE = 0, 1, 2, 13, 14

# HTTP status -> gRPC status when a response is not a gRPC one (gRPC's http-grpc-status-mapping.md).
_HTTP_STATUS = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE,
                503: UNAVAILABLE, 504: UNAVAILABLE}
# RST_STREAM error code -> gRPC status (PROTOCOL.md of grpc).
_RST_STATUS = {ErrorCodes.CANCEL: CANCELLED, ErrorCodes.REFUSED_STREAM: UNAVAILABLE,
               ErrorCodes.ENHANCE_YOUR_CALM: 8, ErrorCodes.INADEQUATE_SECURITY: 7}

_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length
_unpack_length = struct.Struct(">I").unpack_from
_DataReceived = h2.events.DataReceived
_WindowUpdated = h2.events.WindowUpdated


class H2GrpcError(Exception):
    """The call ended with a non-OK status: from the trailers, a reset, or a lost connection."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        return STATUS_NAMES[self.code] if 0 <= self.code < len(STATUS_NAMES) else str(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.details}"


class H2Stream(asyncio.Protocol):
    """One HTTP/2 connection carrying one gRPC bidirectional stream (stream id 1)."""

    def __init__(self, authority: str, path: str, metadata: Iterable[tuple[str, str]] = ()) -> None:
        self._headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                         (b":authority", authority.encode()), (b"content-type", b"application/grpc"),
                         (b"te", b"trailers"), (b"user-agent", b"xdsd-bench-h2grpc")]
        self._headers += [(k.lower().encode(), v.encode()) for k, v in metadata]
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._transport: asyncio.Transport | None = None
        self._sid = 1
        self._out = bytearray()  # framed messages waiting for the peer's window
        self._buf = bytearray()  # an incomplete message (received so far)
        self._need = 5  # bytes _buf must hold before it can yield a message
        self._msgs: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # the server ended the stream with status OK
        self._error: H2GrpcError | None = None
        self._status: int | None = None
        self._message = ""
        self._http_status: int | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        conn = self._conn
        # Effective at once (not after the peer's ACK): the SETTINGS frame precedes any stream.
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0, SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            SettingCodes.MAX_HEADER_LIST_SIZE: 65536, SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(WINDOW - _DEFAULT_WINDOW)  # the connection window
        self._sid = conn.get_next_available_stream_id()
        conn.send_headers(self._sid, self._headers)
        transport.write(conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(INTERNAL, f"HTTP/2 protocol error: {exc!r}")
            self._abort()
            return
        consumed = 0
        for ev in events:
            kind = type(ev)
            if kind is _DataReceived:
                consumed += ev.flow_controlled_length or 0
                if ev.data:
                    self._feed(ev.data)
            elif kind is _WindowUpdated:
                if self._out:
                    self._flush()
            else:
                self._event(ev)
        if consumed:  # once per read, not per frame; h2 sends WINDOW_UPDATE past half the window
            conn.acknowledge_received_data(consumed, self._sid)
        out = conn.data_to_send()  # PING ACKs, WINDOW_UPDATEs, SETTINGS ACKs
        if out and self._transport is not None:
            self._transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._ended:
            self._fail(UNAVAILABLE, f"connection lost: {exc!r}" if exc else "connection closed by the server")
        self._wake()

    # -- frames other than DATA and WINDOW_UPDATE (rare: once or twice per stream) --------------

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            headers = dict(ev.headers or ())
            self._http_status = int(headers.get(b":status", b"0"))
            self._trailers(headers)  # a Trailers-Only response carries grpc-status here
        elif isinstance(ev, h2.events.TrailersReceived):
            self._trailers(dict(ev.headers or ()))
        elif isinstance(ev, h2.events.StreamEnded):
            self._end()
        elif isinstance(ev, h2.events.StreamReset):
            code = _RST_STATUS.get(ev.error_code, INTERNAL)  # type: ignore[arg-type]  # ErrorCodes | int | None
            self._fail(code, f"stream reset by the server: {ev.error_code!r}")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._fail(UNAVAILABLE, f"GOAWAY from the server: {ev.error_code!r} {ev.additional_data!r}")
        elif isinstance(ev, h2.events.RemoteSettingsChanged) and self._out:
            self._flush()  # a bigger initial window opens the stream's window

    def _trailers(self, headers: dict[bytes, bytes]) -> None:
        status = headers.get(b"grpc-status")
        if status is not None:
            self._status = int(status)
            self._message = unquote(headers.get(b"grpc-message", b"").decode("utf-8", "replace"))

    def _end(self) -> None:
        if self._status is None:
            http = self._http_status
            if http != 200:
                self._fail(_HTTP_STATUS.get(http or 0, UNKNOWN), f"HTTP status {http}, not a gRPC response")
            else:
                self._fail(INTERNAL, "stream ended without grpc-status")
        elif self._status != OK:
            self._fail(self._status, self._message)
        elif self._buf:
            self._fail(INTERNAL, f"stream ended inside a message ({len(self._buf)} bytes of {self._need})")
        else:
            self._ended = True
            self._wake()

    def _fail(self, code: int, details: str) -> None:
        if self._error is None and not self._ended:
            self._error = H2GrpcError(code, details)
        self._wake()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- receiving ------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Complete messages from ``data`` (plus what was held) to the reader; keep the rest."""
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        n = len(data)
        pos = 0
        msgs = self._msgs
        while n - pos >= 5:
            end = pos + 5 + _unpack_length(data, pos + 1)[0]
            if end > n:
                self._need = end - pos
                break
            if data[pos]:
                self._fail(INTERNAL, "compressed message, but no compression was negotiated")
                self._abort()
                return
            msgs.append(data[pos + 5:end])
            pos = end
        else:
            self._need = 5
        if pos < n:
            buf += data[pos:] if pos else data
        if msgs:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def read(self) -> bytes | None:
        """The next message; ``None`` once the server ended the call with status OK."""
        while True:
            if self._msgs:
                return self._msgs.popleft()
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def __aiter__(self) -> H2Stream:
        return self

    async def __anext__(self) -> bytes:
        msg = await self.read()
        if msg is None:
            raise StopAsyncIteration
        return msg

    # -- sending --------------------------------------------------------------------------------

    def write(self, msg: bytes) -> None:
        """Send one message (gRPC-framed). Buffered if the peer's flow-control window is short."""
        if self._error is not None:
            raise self._error
        if self._transport is None:
            raise H2GrpcError(UNAVAILABLE, "not connected")
        frame = _PREFIX.pack(0, len(msg)) + msg
        conn = self._conn
        if not self._out and len(frame) <= min(conn.local_flow_control_window(self._sid),
                                                conn.max_outbound_frame_size):
            conn.send_data(self._sid, frame)
            self._transport.write(conn.data_to_send())
            return
        self._out += frame
        self._flush()

    def _flush(self) -> None:
        conn, sid, out = self._conn, self._sid, self._out
        try:
            while out:
                size = min(len(out), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if size <= 0:
                    break
                conn.send_data(sid, bytes(out[:size]))
                del out[:size]
        except h2.exceptions.ProtocolError as exc:  # the stream is closed: the reader sees why
            out.clear()
            self._fail(INTERNAL, f"cannot send: {exc!r}")
        data = conn.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        """Cancel the call (RST_STREAM CANCEL, GOAWAY) and close the connection. Readers see CANCELLED."""
        self._fail(CANCELLED, "closed by the client")
        transport = self._transport
        if transport is None:
            return
        conn = self._conn
        try:
            if not self._ended:
                conn.reset_stream(self._sid, ErrorCodes.CANCEL)
            conn.close_connection()
            transport.write(conn.data_to_send())
        except h2.exceptions.ProtocolError:
            pass
        transport.close()


async def open_stream(host: str, port: int, path: str, metadata: Iterable[tuple[str, str]] = (),
                      source: str | None = None) -> H2Stream:
    """Connect (one TCP connection, from ``source`` if given) and start the call: request headers
    go out at once."""
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _, stream = await loop.create_connection(lambda: H2Stream(authority, path, metadata), host, port,
                                             local_addr=(source, 0) if source else None)
    return stream
