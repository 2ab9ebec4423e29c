"""One client connection: HTTP/2 (h2) on an asyncio transport, and the calls on its streams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from time import perf_counter
from typing import TYPE_CHECKING, cast

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from xdsd.transport.call import Call, grpc_message, wake
from xdsd.transport.context import metadata_from, parse_timeout, peer_string

if TYPE_CHECKING:
    from xdsd.transport.server import GrpcServer

log = logging.getLogger(__name__)

# A connection must open its first stream this soon after it is accepted (TLS handshake included).
HANDSHAKE_TIMEOUT = 30.0

_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None)
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity"))
_Data = h2.events.DataReceived
_Request = h2.events.RequestReceived
_Ended = h2.events.StreamEnded
_Window = h2.events.WindowUpdated
_Reset = h2.events.StreamReset


def _header_value(value: str | bytes, key: str) -> bytes:
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return base64.b64encode(raw).rstrip(b"=")
    return value.encode("latin-1") if isinstance(value, str) else value  # UnicodeError: invalid metadata


def _metadata_headers(metadata: tuple[tuple[str, str | bytes], ...]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("ascii"), _header_value(v, k.lower())) for k, v in metadata]


class Connection(asyncio.Protocol):
    """Turns h2 events into calls; writes what h2 has to send after each batch of events."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.max_message = server.max_receive_message_length
        self.h2 = h2.connection.H2Connection(config=_CONFIG)
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        self._handshake: asyncio.TimerHandle | None = None
        self._closing = False
        self._started = False  # HTTP/2 set up (on the first bytes)
        self._backlog: list[bytes] | None = None  # bytes kept while over the read budget

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Kept small: a reconnect storm accepts a thousand connections in one loop iteration. The
        # HTTP/2 setup happens with the first bytes, under the server's read budget.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.server.connections.add(self)
        self._handshake = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)

    def _start(self) -> None:
        self._started = True
        transport = self.transport
        if transport is not None:
            self.peer = peer_string(transport.get_extra_info("peername"))
        h2c = self.h2
        h2c.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.server.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.server.max_header_list_size,
        })
        # RFC 9113 §3.4: the server's preface is a SETTINGS frame; the client may send before it.
        h2c.initiate_connection()
        # RFC 9113 §6.9.2: the connection window starts at 65,535 whatever SETTINGS say; open it.
        if self.server.connection_window > 65_535:
            h2c.increment_flow_control_window(self.server.connection_window - 65_535)

    def data_received(self, data: bytes) -> None:
        budget = self.server.read_budget
        if self._backlog is not None or budget.exhausted():
            self._defer(data)
            return
        started = perf_counter()
        self._process(data)
        budget.charge(perf_counter() - started)

    def _defer(self, data: bytes) -> None:
        """Over this iteration's read budget: keep the bytes, stop reading, wait for a later turn."""
        if self._backlog is None:
            self._backlog = [data]
            self._set_reading()
            self.server.read_budget.queue(self)
        else:
            self._backlog.append(data)

    def resume_backlog(self) -> None:
        """Our turn (from the read budget): process what was kept, read again."""
        backlog, self._backlog = self._backlog, None
        self._set_reading()
        if backlog and self.transport is not None and not self.transport.is_closing():
            self._process(b"".join(backlog))

    def _set_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.paused or self._backlog is not None:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _process(self, data: bytes) -> None:
        if not self._started:
            self._start()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self.write_out()  # h2 queued the GOAWAY
            self._close()
            return
        calls = self.calls
        for event in events:
            kind = type(event)
            if kind is _Data:
                call = calls.get(event.stream_id)
                if call is None:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                else:
                    call.feed(event.data, event.flow_controlled_length)
            elif kind is _Request:
                self._request(event)
            elif kind is _Ended:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.end_of_requests()
            elif kind is _Window:
                if event.stream_id == 0:
                    for call in list(calls.values()):
                        call.window_opened()
                else:
                    call = calls.get(event.stream_id)
                    if call is not None:
                        call.window_opened()
            elif kind is _Reset:
                call = calls.pop(event.stream_id, None)
                if call is not None:
                    call.abandon()
            elif kind is h2.events.RemoteSettingsChanged:
                for call in list(calls.values()):
                    call.window_opened()
            elif kind is h2.events.TrailersReceived:
                # gRPC clients end requests with END_STREAM on DATA; trailers carry no requests.
                call = calls.get(event.stream_id)
                if call is not None:
                    call.end_of_requests()
            elif kind is h2.events.ConnectionTerminated:
                self._closing = True
                if not calls:
                    self._close()
        self.write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.abandon()
        self._wake_writers()

    def pause_writing(self) -> None:
        # The peer is not reading. Stop reading it too: otherwise what it sends (pings, requests)
        # makes answers that pile up in our buffer without bound.
        self.paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._set_reading()
        self._wake_writers()

    # -- calls ------------------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        sid = event.stream_id
        pseudo: dict[bytes, bytes] = {}
        rest: list[tuple[bytes, bytes]] = []
        for key, value in event.headers or ():
            if key[:1] == b":":
                pseudo[key] = value
            else:
                rest.append((key, value))
        if self._closing or self.server.stopping:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if pseudo.get(b":method") != b"POST":
            self._http_error(sid, b"405")
            return
        headers = dict(rest)
        content_type = headers.get(b"content-type", b"")
        if not content_type.startswith(b"application/grpc"):
            self._http_error(sid, b"415")
            return
        path = pseudo.get(b":path", b"").decode("latin-1")
        handler = self.server.lookup(path)
        if handler is None:
            self._status_only(sid, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        encoding = headers.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            self._status_only(sid, grpc.StatusCode.UNIMPLEMENTED,
                              f"grpc-encoding {encoding.decode('latin-1')!r} is not supported")
            return
        deadline = None
        timeout_header = headers.get(b"grpc-timeout")
        if timeout_header is not None:
            timeout = parse_timeout(timeout_header.decode("latin-1"))
            if timeout is not None:
                deadline = self.loop.time() + timeout
        call = Call(self, sid, handler, metadata_from(rest), self.peer, deadline)
        self.calls[sid] = call
        call.task = task = self.loop.create_task(call.run())
        task.add_done_callback(lambda _t, call=call: self._call_done(call))
        if deadline is not None:
            handle = self.loop.call_at(deadline, call.expire)
            task.add_done_callback(lambda _t: handle.cancel())

    def _call_done(self, call: Call) -> None:
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
        if self._closing and not self.calls:
            self._close()

    def _http_error(self, sid: int, status: bytes) -> None:
        self.h2.send_headers(sid, [(b":status", status)], end_stream=True)

    def _status_only(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self.h2.send_headers(sid, [*_RESPONSE_HEADERS, (b"grpc-status", str(code.value[0]).encode()),
                                   (b"grpc-message", grpc_message(details))], end_stream=True)

    def send_headers(self, sid: int, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        """Queued with h2: they leave with the first message (or ``write_out``)."""
        try:
            headers = [*_RESPONSE_HEADERS, *_metadata_headers(metadata)]
        except (UnicodeError, AttributeError) as exc:
            raise ValueError(f"Invalid metadata: {exc}") from exc
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.send_headers(sid, headers)

    def send_trailers(self, call: Call, code: grpc.StatusCode, details: str,
                      trailing: tuple[tuple[str, str | bytes], ...], trailers_only: bool) -> None:
        try:
            extra = _metadata_headers(trailing)
        except (UnicodeError, ValueError, AttributeError) as exc:
            code, details, extra = grpc.StatusCode.INTERNAL, f"Invalid metadata: {exc}", []
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            trailers.append((b"grpc-message", grpc_message(details)))
        trailers.extend(extra)
        if trailers_only:
            trailers = [*_RESPONSE_HEADERS, *trailers]
        sid = call.stream_id
        h2c = self.h2
        try:
            h2c.send_headers(sid, trailers, end_stream=True)
            if not call._eof:
                # RFC 9113 §8.1: after a complete response the server may stop the request
                # with RST_STREAM(NO_ERROR); the client gets its status all the same.
                h2c.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:
            pass
        self.calls.pop(sid, None)
        self.write_out()

    def flush(self, call: Call) -> None:
        """Send as much of the call's pending output as the peer's windows allow."""
        h2c = self.h2
        sid = call.stream_id
        pending = call.pending
        frame = h2c.max_outbound_frame_size
        try:
            while pending:
                window = h2c.local_flow_control_window(sid)
                if window <= 0:
                    break
                chunk = pending[0]
                size = min(window, frame)
                if len(chunk) <= size:
                    h2c.send_data(sid, chunk)
                    pending.popleft()
                else:
                    view = memoryview(chunk)
                    h2c.send_data(sid, view[:size])
                    pending[0] = view[size:]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pending.clear()
            call.abandon()
        self.write_out()
        if not pending:
            call.drained()

    def open_connection_window(self, size: int) -> None:
        """Reopen the connection's window alone (a stream holding its own window for a slow reader).
        When that stream's bytes are acknowledged later, h2 counts them for the connection again;
        its window manager never opens past the connection window, so that costs nothing."""
        if size:
            self.h2.increment_flow_control_window(size)

    def acknowledge(self, sid: int, size: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except h2.exceptions.StreamClosedError:
                pass

    def write_out(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def writable(self) -> None:
        if self.paused:
            if self._writable is None or self._writable.done():
                self._writable = self.loop.create_future()
            # Shared by every paused writer: one cancelled (a deadline) must not cancel the others.
            await asyncio.shield(self._writable)

    def _wake_writers(self) -> None:
        waiter, self._writable = self._writable, None
        wake(waiter)

    # -- ending -----------------------------------------------------------------------------

    def go_away(self) -> None:
        """Stop taking new streams, let the open calls finish (GOAWAY, RFC 9113 §6.8), close once
        they end. The frame is written directly: h2's close_connection() would end the connection's
        state machine and fail every call still running."""
        if self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        if self._started:
            frame = GoAwayFrame(stream_id=0, error_code=h2.errors.ErrorCodes.NO_ERROR,
                                last_stream_id=self.h2.highest_inbound_stream_id)
            self.write_out()
            self.transport.write(frame.serialize())
        if not self.calls:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        self._handshake = None
        if not self.calls:
            log.debug("closing %s: no request within %.0f s", self.peer, HANDSHAKE_TIMEOUT)
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
