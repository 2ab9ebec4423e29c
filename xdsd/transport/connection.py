"""One client connection: HTTP/2 (h2) on an asyncio transport, and the calls on its streams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
from time import perf_counter
from typing import TYPE_CHECKING, cast

import grpc
import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from xdsd.transport import compat
from xdsd.transport.call import Call, grpc_message, wake
from xdsd.transport.context import metadata_from, parse_timeout, peer_string
from xdsd.transport.limits import source_of

if TYPE_CHECKING:
    from xdsd.transport.server import GrpcServer

log = logging.getLogger(__name__)

# A connection must open its first stream this soon after it is accepted, TLS handshake included;
# with an ``authorize`` function, its first stream that passes it. Otherwise it is closed.
HANDSHAKE_TIMEOUT = 10.0
# The connection window every HTTP/2 connection starts with (RFC 9113 §6.9.2). A connection may hold
# this much of received requests without drawing on the process's budget (GrpcServer.max_buffered),
# so small requests (ACKs) keep flowing when the budget is spent; a partial message always draws.
FREE_WINDOW = 65_535
# Before a connection is authenticated: its request DATA is dropped (its calls were refused) and
# its window reopened for it up to this many bytes in all, then no more until a call passes
# ``authorize`` (HEADERS are not flow-controlled, RFC 9113 §5.2, so it still can).
UNAUTHENTICATED_DISCARD = 1 << 20
# The largest request message of a call allowed before its connection is authenticated (a method
# that ``authorize`` lets through without credentials): it must fit in FREE_WINDOW.
UNAUTHENTICATED_MAX_MESSAGE = 32 * 1024
# Frames handed to h2 at a time; the read budget is checked between such slices of a read (one read
# of small frames holds thousands of them).
FRAMES_PER_SLICE = 64
# Stream resets (by the client, or by h2 for a client's stream error), SETTINGS frames, and requests
# answered at once without a call (refused by ``authorize``, unknown method, not gRPC), per
# connection: a burst, then a sustained rate per second (nghttp2's figures for resets). Past them the
# connection ends with GOAWAY ENHANCE_YOUR_CALM. Each costs real work: a reset, a call started and
# cancelled (HTTP/2 "rapid reset", CVE-2023-44487); a SETTINGS frame, h2 visiting every stream.
# Envoy and grpcio send a handful of any of them in a connection's life.
CHURN_BURST = 1000
CHURN_RATE = 33.0
# The dynamic table of our HPACK encoder, however large a table the client allows (RFC 7541 §4.2: an
# encoder may use less). Unbounded, every distinct header value sent (grpc-message) stayed in it.
ENCODER_TABLE_SIZE = 4096
# TCP keepalive probes: after 60 s of silence, every 10 s, 6 unanswered ones end the connection.
KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))
# Closed streams h2 remembers per connection (its default, 65,536, is ~8 MB per connection).
CLOSED_STREAMS = 1024

_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None)
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity"))
# The same headers as an HPACK block that leaves every dynamic table alone (RFC 7541 §6.1 indexed
# field 8 of the static table; §6.2.2 literals without indexing, the first with name 31 of the
# static table): the same bytes on every connection (compat "headers-out").
_RESPONSE_BLOCK = (b"\x88" + b"\x0f\x10" + b"\x10application/grpc"
                   + b"\x00\x14grpc-accept-encoding" + b"\x08identity")
_Data = h2.events.DataReceived
_Request = h2.events.RequestReceived
_Ended = h2.events.StreamEnded
_Window = h2.events.WindowUpdated
_Reset = h2.events.StreamReset
_OK = grpc.StatusCode.OK


# h2 with our limits: at most CLOSED_STREAMS closed streams remembered, the receive window held at
# FREE_WINDOW until ``refill`` opens it (every hook on h2's internals is in compat.py).
_H2Connection = compat.server_connection_class(max_closed_streams=CLOSED_STREAMS, receive_window=FREE_WINDOW)
# Queued message bytes past which write_out writes at once instead of at the end of the loop
# iteration: a handler that writes in a loop without waiting must still reach the socket, and
# meet its backpressure (pause_writing).
WRITE_NOW_BYTES = 64 * 1024
# A PING frame's header with the ACK flag, on stream 0 (RFC 9113 §6.7); the 8 bytes of opaque data follow.
_PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"


class FrameError(Exception):
    def __init__(self, code: h2.errors.ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


class FrameWalk:
    """Follows the frame headers of a connection's input, ahead of h2: h2 checks a frame's length
    only once the whole frame is buffered (a header claiming 16 MiB made it buffer 16 MiB), and
    takes up to 64 CONTINUATION frames (1 MiB) for one header block, decoded in one go. Here a
    frame over ``max_frame`` bytes or a header block over ``max_block`` fails as soon as its frame
    header arrives; ``cut`` also says where a slice of a read ends, and which of its frames the
    connection may handle without h2 (``control``)."""

    __slots__ = ("max_frame", "max_block", "control", "_skip", "_head", "_block")

    def __init__(self, max_frame: int, max_block: int) -> None:
        self.max_frame = max_frame
        self.max_block = max_block
        # Where the frames of a slice that the connection may handle itself begin, in order, when
        # the whole frame is in ``data``: WINDOW_UPDATE and PING outside a header block, and DATA
        # without padding or END_STREAM that no frame left to h2 precedes in the slice (handled
        # first, they would otherwise overtake it: a RST_STREAM, the rest of a frame h2 holds).
        self.control: list[int] = []
        self._skip = 24  # the client's connection preface (RFC 9113 §3.4); h2 checks its bytes
        self._head = b""  # a frame header split across reads
        self._block = 0  # bytes of the header block (HEADERS + CONTINUATION) being received

    def cut(self, data: bytes, start: int, frames: int) -> int:
        """The offset in ``data`` after ``frames`` more frames from ``start`` (``len(data)`` if fewer
        begin in it). Raises FrameError for a frame past the limits."""
        end = len(data)
        pos = start
        # h2 holds the beginning of a frame (or the preface): DATA may not overtake it.
        ordered = bool(self._skip or self._head)
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
                if self._skip:
                    return end
            if not frames or pos == end:
                return pos
            need = 9 - len(self._head)
            if end - pos < need:
                self._head += data[pos:]
                return end
            split = bool(self._head)
            header = self._head + data[pos:pos + need] if split else data[pos:pos + 9]
            self._head = b""
            pos += need
            length = int.from_bytes(header[:3], "big")
            if length > self.max_frame:
                raise FrameError(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            kind = header[3]
            if kind == 0x1 or kind == 0x9:  # HEADERS, CONTINUATION
                block = length + (self._block if kind == 0x9 else 0)
                if block > self.max_block:
                    raise FrameError(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, f"a header block of {block}+ bytes")
                self._block = 0 if header[4] & 0x4 else block  # END_HEADERS
                ordered = True
            elif split or self._block or pos + length > end:
                ordered = True
            elif kind == 0x8 or kind == 0x6:  # WINDOW_UPDATE, PING (the connection's turn: see _control)
                self.control.append(pos - 9)
            elif kind == 0x0 and not ordered and not header[4] & 0x9:  # DATA without END_STREAM, PADDED
                self.control.append(pos - 9)
            else:  # anything for h2, SETTINGS included: it may end the connection or change a window
                ordered = True
            self._skip = length
            frames -= 1


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a listening socket, which the connections it accepts inherit: a proxy whose
    machine died (no FIN, no RST) is noticed after about two minutes of silence instead of holding
    its connection and streams forever."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE_OPTIONS:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _header_value(value: str | bytes, key: str) -> bytes:
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return base64.b64encode(raw).rstrip(b"=")
    return value.encode("latin-1") if isinstance(value, str) else value  # UnicodeError: invalid metadata


def _metadata_headers(metadata: tuple[tuple[str, str | bytes], ...]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("ascii"), _header_value(v, k.lower())) for k, v in metadata]


class Connection(asyncio.Protocol):
    """Turns h2 events into calls; writes what h2 has to send after each batch of events.

    Request bytes are accounted at three levels (RFC 9113 §5.2 flow control does the holding): a call
    holds at most its INBOX_LIMIT (or one whole message), a connection at most the server's
    ``max_connection_buffer`` in held bytes plus open window, and the process what its
    ``max_buffered`` allows beyond FREE_WINDOW per connection. A window is reopened only as far as
    those limits allow; a client at a limit waits, it does not grow our memory."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        # Authenticated: a call passed the server's ``authorize`` (or there is none). Until then the
        # connection's window stays at FREE_WINDOW and it counts against its source's limit.
        self.authenticated = server.authorize is None
        self.max_message = server.max_receive_message_length if self.authenticated else min(
            server.max_receive_message_length, UNAUTHENTICATED_MAX_MESSAGE)
        # What the connection may hold plus its open window (refill).
        self.buffer_limit = server.max_connection_buffer if self.authenticated else FREE_WINDOW
        self.h2 = _H2Connection(config=_CONFIG)
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.source = "local"
        self.paused = False
        self.partial = 0  # bytes of partly received messages, over all calls
        self.complete = 0  # bytes of received messages not read yet (and MESSAGE_OVERHEAD each)
        self.need = 0  # bytes still to come of the partly received messages whose size is known
        self.charge = 0  # what this connection draws on the server's max_buffered (see refill)
        self._discarded = 0  # request bytes dropped while unauthenticated
        self.open_since = self.loop.time()  # since when the window has been open (not shut by us)
        self.progress = self.open_since  # when request DATA last arrived
        self._writable: asyncio.Future[None] | None = None
        self._write_soon = False  # a write of what h2 queued is scheduled for this loop iteration
        self._queued = 0  # message bytes queued with h2 since the last write
        self._acks: list[bytes] = []  # PING ACK frames to send (see _control)
        self._out: list[bytes] = []  # frames to send ahead of what h2 queued since (see flush)
        self._closing = False
        self._started = False  # HTTP/2 set up (on the first bytes)
        self._backlog: list[bytes] | None = None  # bytes kept while over the read budget
        # A header list within its limit takes less than 4 times its size in a header block (HPACK's
        # Huffman code takes at most 30 bits for a byte, and some encoders always use it).
        self._frames = FrameWalk(self.h2.max_inbound_frame_size, 4 * server.max_header_list_size)
        self._churn = float(CHURN_BURST)  # resets, refused calls and SETTINGS allowed now (a token bucket)
        self._churn_at = self.loop.time()
        # Made when the connection is accepted, before a TLS handshake: the deadline includes it.
        self._handshake: asyncio.TimerHandle | None = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Kept small: a reconnect storm accepts a thousand connections in one loop iteration. The
        # HTTP/2 setup happens with the first bytes, under the server's read budget.
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        peername = transport.get_extra_info("peername")
        self.source = source_of(peername)
        if self.server.stopping or not self.server.table.admit(self, self.source, authenticated=self.authenticated):
            log.debug("refusing a connection from %s: %d connections open", self.source, len(self.server.table))
            self.transport = None
            transport.abort()
            return
        self.server.connections.add(self)

    def _start(self) -> None:
        self._started = True
        transport = self.transport
        if transport is not None:
            self.peer = peer_string(transport.get_extra_info("peername"))
        h2c = self.h2
        compat.install_encoder(h2c, ENCODER_TABLE_SIZE)
        compat.install_decoder(h2c, self.server.max_header_list_size)
        compat.replace_local_settings(h2c, {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.server.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.server.max_header_list_size,
        })
        # RFC 9113 §3.4: the server's preface is a SETTINGS frame; the client may send before it.
        # The connection window stays at its initial 65,535 (§6.9.2): refill() opens it as requests
        # need it.
        h2c.initiate_connection()

    def data_received(self, data: bytes) -> None:
        if self._backlog is not None:
            self._backlog.append(data)
            return
        self._consume(data)

    def _consume(self, data: bytes) -> None:
        """Hand ``data`` to h2 a slice of frames at a time while the read budget lasts; keep the rest."""
        budget = self.server.read_budget
        start, end = 0, len(data)
        while start < end:
            if budget.exhausted():
                self._defer(data[start:] if start else data)
                return
            try:
                cut = self._frames.cut(data, start, FRAMES_PER_SLICE)
            except FrameError as exc:
                self._fail(exc.code, str(exc))
                return
            started = perf_counter()
            control = self._frames.control
            if control:
                self._frames.control = []
                if start:
                    control = [at - start for at in control]
            self._process(data[start:cut] if start or cut < end else data, control)
            budget.charge(perf_counter() - started)
            start = cut
            if self.transport is None or self.transport.is_closing():
                return

    def _defer(self, data: bytes) -> None:
        """Over this iteration's read budget: keep the bytes, stop reading, wait for a later turn."""
        self._backlog = [data]
        self._set_reading()
        self.server.read_budget.queue(self)

    def resume_backlog(self) -> None:
        """Our turn (from the read budget): process what was kept, read again."""
        backlog, self._backlog = self._backlog, None
        self._set_reading()
        if backlog and self.transport is not None and not self.transport.is_closing():
            self._consume(backlog[0] if len(backlog) == 1 else b"".join(backlog))

    def _fail(self, code: h2.errors.ErrorCodes, reason: str) -> None:
        """End the connection for the client's misbehaviour: GOAWAY with ``code``, then close."""
        if not self._started:
            self._start()
        log.debug("closing %s: %s", self.peer, reason)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(code)
        self._close()

    def shed(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Close now: the server's connection table needs this connection's slot (it is full, and
        this one is unauthenticated or idle), or the connection holds buffer space it does not use.
        GOAWAY (RFC 9113 §6.8) with ``code``, then close."""
        log.debug("shedding %s (%s)", self.peer if self._started else self.source,
                  "authenticated" if self.authenticated else "unauthenticated")
        if not self._started:
            if self.transport is not None:
                self.transport.abort()
            return
        self._fail(code, "shed")

    def _churn_allowed(self, what: str = "refused calls") -> bool:
        """One more of what costs us and nothing the client (a reset, a refused call, SETTINGS);
        False, and GOAWAY(ENHANCE_YOUR_CALM), once the connection's bucket is empty."""
        now = self.loop.time()
        self._churn = min(float(CHURN_BURST), self._churn + (now - self._churn_at) * CHURN_RATE) - 1.0
        self._churn_at = now
        if self._churn >= 0.0:
            return True
        self._fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, f"too many {what}")
        return False

    def _set_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.paused or self._backlog is not None:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _control(self, data: bytes, at: list[int], fed: dict[Call, None]) -> tuple[bytes, bool, int]:
        """Apply the frames that begin at offsets ``at`` of ``data`` without h2's frame machinery:
        WINDOW_UPDATE and PING (RFC 9113 §6.9, §6.7) and DATA of open streams (§6.1, feeding their
        calls, which are added to ``fed``); return the rest of ``data`` for h2, whether the
        connection's window opened, and the request bytes fed. A frame h2 must judge (a bad length
        or increment, a stream not open, a PING's ACK, a PING on a stream, DATA past a window) is
        left in the rest, and so is every DATA frame after any frame left there (h2 may end the
        connection or the stream at that frame: nothing after it may reach a call first)."""
        h2c = self.h2
        calls = self.calls
        kept: list[bytes] = []
        pos = 0
        windows = False
        held = 0
        data_to_h2 = False
        for start in at:
            length = int.from_bytes(data[start:start + 3], "big")
            kind = data[start + 3]
            sid = int.from_bytes(data[start + 5:start + 9], "big") & 0x7FFFFFFF
            if kind == 0x0:
                call = calls.get(sid) if not data_to_h2 else None
                if call is None or not compat.receive_data(h2c, sid, length):
                    data_to_h2 = True
                    continue
                held += length
                call.feed(data[start + 9:start + 9 + length], length)
                fed[call] = None
            elif kind == 0x8:
                payload = data[start + 9:start + 9 + length]
                if length != 4 or not compat.window_update(h2c, sid, int.from_bytes(payload, "big") & 0x7FFFFFFF):
                    data_to_h2 = True  # h2 judges it (it may end the connection): no DATA after it goes first
                    continue
                if sid == 0:
                    windows = True
                else:
                    call = calls.get(sid)
                    if call is not None:
                        call.window_opened()
            else:
                if length != 8 or sid or data[start + 4] & 0x1:
                    data_to_h2 = True
                    continue
                self._acks.append(_PING_ACK + data[start + 9:start + 17])
            kept.append(data[pos:start])
            pos = start + 9 + length
        if pos == 0:
            return data, windows, held
        kept.append(data[pos:])
        if self._acks:
            self.write_out()
        return b"".join(kept), windows, held

    def _process(self, data: bytes, control: list[int] | None = None) -> None:
        if not self._started:
            self._start()
        h2c = self.h2
        window = h2c.inbound_flow_control_window
        windows = False  # the connection's window or every stream's opened: flush every call, once
        held = 0  # request bytes fed to calls (the rest of what the window took was dropped)
        fed: dict[Call, None] = {}
        if control and compat.control_ready(h2c):
            data, windows, held = self._control(data, control, fed)
        if data:
            try:
                events = h2c.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
                self._close()  # it sends the GOAWAY h2 queued (compat: "protocol-error-goaway")
                return
        else:
            events = []
        calls = self.calls
        for event in events:
            kind = type(event)
            if kind is _Data:
                call = calls.get(event.stream_id)
                if call is not None:
                    held += len(event.data)
                    call.feed(event.data, event.flow_controlled_length)
                    fed[call] = None
            elif kind is _Request:
                try:
                    self._request(event)
                except h2.exceptions.StreamClosedError:
                    pass  # answered at once, but reset by the client in the same read (its event follows)
                if self.transport is None or self.transport.is_closing():
                    return  # closed for answering too many requests at once (_churn_allowed)
            elif kind is _Ended:
                call = calls.get(event.stream_id)
                if call is not None:
                    call.end_of_requests()
            elif kind is _Window:
                if event.stream_id == 0:
                    windows = True
                else:
                    call = calls.get(event.stream_id)
                    if call is not None:
                        call.window_opened()
            elif kind is _Reset:
                call = calls.get(event.stream_id)
                if call is not None:
                    self._forget(call)
                    call.abandon()
                if not self._churn_allowed("stream resets"):
                    return
            elif kind is h2.events.RemoteSettingsChanged:
                windows = True
                if not self._churn_allowed("SETTINGS frames"):
                    return
            elif kind is h2.events.TrailersReceived:
                # gRPC clients end requests with END_STREAM on DATA; trailers carry no requests.
                call = calls.get(event.stream_id)
                if call is not None:
                    call.end_of_requests()
            elif kind is h2.events.ConnectionTerminated:
                self._closing = True
                if not calls:
                    self._close()
        if windows:
            for call in list(calls.values()):
                call.window_opened()
        consumed = window - h2c.inbound_flow_control_window
        if consumed > 0:
            self.progress = self.loop.time()
            if not self.authenticated:
                self._discarded += max(0, consumed - held)
        queued = bool(data)  # h2 took frames: it may have answers queued (SETTINGS ACK, RST_STREAM, ...)
        for call in fed:
            queued = call.grant() or queued
        if self.refill() or queued:
            self.write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.table.remove(self)
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.release()
            call.abandon()
        self.server.forget(self)
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

    # -- flow control and accounting (RFC 9113 §5.2, §6.9) ------------------------------------

    def account(self, partial: int, complete: int, need: int) -> None:
        """A call's held bytes changed by these amounts."""
        self.partial += partial
        self.complete += complete
        self.need += need
        server = self.server
        server.buffered += partial + complete
        if (partial < 0 or complete < 0) and server.starved:
            server.retry_starved()

    def refill(self, turn: bool = False) -> bool:
        """Reopen the connection's window as far as the limits allow; True if a WINDOW_UPDATE was
        queued. Authenticated: up to FREE_WINDOW plus what the messages being received still need,
        at most ``connection_window``, and held plus open window within ``max_connection_buffer``;
        what goes past FREE_WINDOW (and every partial message) is charged to ``max_buffered``
        (``_charge``). Unauthenticated: FREE_WINDOW, for at most UNAUTHENTICATED_DISCARD dropped
        bytes.

        While connections wait for the process's budget, budget goes to them only, on their
        ``turn`` (GrpcServer.retry_starved: the message closest to complete first), not to
        whichever connection happens to read next."""
        server = self.server
        transport = self.transport
        if transport is None or transport.is_closing():
            server.forget(self)  # going: it draws on nothing (its calls give back what they hold)
            return False
        window = self.h2.inbound_flow_control_window
        held = self.partial + self.complete
        charge = self._charge(window)
        if charge != self.charge:
            server.charged += charge - self.charge
            self.charge = charge
        if self.authenticated:
            want = min(server.connection_window, server.max_connection_buffer - held, FREE_WINDOW + self.need)
        elif self._discarded < UNAUTHENTICATED_DISCARD:
            want = FREE_WINDOW - held
        else:
            want = 0
        granted = False
        short = False  # the budget kept this connection's window below what it wants
        # Like h2's own window manager: an update once half the window is used, not one per frame.
        if want > window and 2 * window <= want:
            grant = want - window
            extra = self._charge(window + grant) - charge
            if extra:
                room = server.max_buffered - server.charged
                if not turn and server.waiting_for_budget(self):
                    room = 0  # others wait for the budget: take a turn after them
                if extra > room:
                    grant -= extra - max(room, 0)
                    short = True
            if grant > 0:
                try:
                    self.h2.increment_flow_control_window(grant)
                except h2.exceptions.ProtocolError:  # the connection is closed
                    return False
                granted = True
                if window <= 0:
                    self.open_since = self.loop.time()
                window += grant
                charge = self._charge(window)
                server.charged += charge - self.charge
                self.charge = charge
        if self.need > window and self.authenticated:
            # The messages being received cannot complete with the window the client has.
            if short:
                server.starving(self, "budget")
            elif server.max_connection_buffer - held <= window:
                server.starving(self, "cap")
            else:
                server.starving(self, None)
        elif self in server.starved or charge and server.charged > server.max_buffered:
            server.starving(self, None)
        return granted

    def idle_credit(self, since: float) -> int:
        """Window beyond FREE_WINDOW that no message being received needs, unused since ``since``
        (a client that was given window for a message and then sent nothing): 0 if none."""
        if self.progress > since or self.open_since > since or self.transport is None or self.transport.is_closing():
            return 0
        return max(0, self.h2.inbound_flow_control_window - FREE_WINDOW - self.need)

    def _charge(self, window: int) -> int:
        """What the connection draws on the process's budget with this window open: what it holds
        and may still be sent beyond FREE_WINDOW, and its partial messages in any case (a client
        that stops in the middle of a message must not hold 64 KiB on every connection for free)."""
        partial = self.partial
        return max(0, partial + self.complete + window - FREE_WINDOW) + min(partial, FREE_WINDOW)

    def open_stream_window(self, sid: int, size: int) -> bool:
        try:
            self.h2.increment_flow_control_window(size, stream_id=sid)
        except (KeyError, h2.exceptions.ProtocolError):  # the stream is closed
            return False
        return True

    # -- calls ------------------------------------------------------------------------------

    def _authenticate(self) -> None:
        """A call passed ``authorize``: the connection is one of the mesh's own."""
        self.authenticated = True
        self.max_message = self.server.max_receive_message_length
        self.buffer_limit = self.server.max_connection_buffer
        self.server.table.authenticated(self, busy=True)
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None

    def _request(self, event: h2.events.RequestReceived) -> None:
        server = self.server
        if self._handshake is not None and server.authorize is None:
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
        if self._closing or server.stopping:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if pseudo.get(b":method") != b"POST":
            if self._churn_allowed():
                self._http_error(sid, b"405")
            return
        headers = dict(rest)
        content_type = headers.get(b"content-type", b"")
        if not content_type.startswith(b"application/grpc"):
            if self._churn_allowed():
                self._http_error(sid, b"415")
            return
        path = pseudo.get(b":path", b"").decode("latin-1")
        handler = server.lookup(path)
        if handler is None:
            if self._churn_allowed():
                self._status_only(sid, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        metadata = metadata_from(rest)
        authorize = server.authorize
        if authorize is not None:
            try:
                verdict = authorize(path, metadata, self.peer)
            except Exception:
                log.exception("authorizing a call to %s failed; refusing it", path)
                verdict = (grpc.StatusCode.INTERNAL, "xdsd: the call could not be authorized")
            if verdict is None:
                if not self.authenticated:
                    self._authenticate()
            elif verdict[0] is not _OK:
                self._refuse(event, verdict[0], verdict[1])
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
        call = Call(self, sid, handler, metadata, self.peer, deadline)
        if not self.calls and self.authenticated:
            server.table.busy(self)
        self.calls[sid] = call
        call.task = task = self.loop.create_task(call.run())
        task.add_done_callback(lambda _t, call=call: self._call_done(call))
        if deadline is not None:
            handle = self.loop.call_at(deadline, call.expire)
            task.add_done_callback(lambda _t: handle.cancel())

    def _refuse(self, event: h2.events.RequestReceived, code: grpc.StatusCode, details: str) -> None:
        """A call ``authorize`` refused: its status at once (trailers-only), and RST_STREAM(NO_ERROR)
        so that the client stops sending its request (RFC 9113 §8.1); DATA that still arrives is
        dropped, never buffered. Refusals count like resets: a client that keeps trying is cut off."""
        sid = event.stream_id
        if not self._churn_allowed():
            return
        self._status_only(sid, code, details)
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # the request had ended: closed
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)

    def _forget(self, call: Call) -> None:
        """``call`` is over: what it held is given back; an idle connection becomes sheddable."""
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
            if not self.calls and self.authenticated and self.transport is not None:
                self.server.table.idle(self)
        call.release()

    def _call_done(self, call: Call) -> None:
        self._forget(call)
        if self.refill():
            self.write_out()
        if self._closing and not self.calls:
            self._close()

    def _http_error(self, sid: int, status: bytes) -> None:
        self.h2.send_headers(sid, [(b":status", status)], end_stream=True)

    def _status_only(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self.h2.send_headers(sid, [*_RESPONSE_HEADERS, (b"grpc-status", str(code.value[0]).encode()),
                                   (b"grpc-message", grpc_message(details))], end_stream=True)

    def send_headers(self, sid: int, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        """Queued: they leave with the first message (or ``write_out``). Without metadata, framed here."""
        if not metadata:
            framed = compat.send_response_headers(self.h2, sid, _RESPONSE_BLOCK)
            if framed is not None:
                self._queue_framed(framed)
                return
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
        self._forget(call)
        self.refill()
        self.write_out()

    def flush(self, call: Call) -> None:
        """Send as much of the call's pending output as the peer's windows allow. DATA frames are
        framed here (compat "data-out"), after whatever h2 queued before them; h2 frames the rest."""
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
                piece = chunk if len(chunk) <= size else memoryview(chunk)[:size]
                framed = compat.send_data(h2c, sid, piece)
                if framed is None:
                    h2c.send_data(sid, piece)
                else:
                    self._queue_framed(framed)
                if piece is chunk:
                    pending.popleft()
                else:
                    pending[0] = memoryview(chunk)[size:]
                self._queued += len(piece)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pending.clear()
            call.abandon()
        self.write_out()
        if not pending:
            call.drained()

    def _queue_framed(self, framed: bytes) -> None:
        """Queue a frame made here, after everything h2 queued before it (write_now keeps the order)."""
        before = self.h2.data_to_send()
        if before:
            self._out.append(before)
        self._out.append(framed)

    def write_out(self) -> None:
        """Send what h2 has queued: once per connection per loop iteration, after everything this
        iteration queued for it. A socket write is a system call, and on loopback it also runs the
        peer's TCP receive; a reconnect storm or a fan-out would otherwise pay it for every frame
        (a response, its WINDOW_UPDATE, a PING's ACK) rather than once per connection."""
        if self._queued >= WRITE_NOW_BYTES:
            self.write_now()  # a handler writing in a loop may not yield to the loop before long
        elif not self._write_soon:
            self._write_soon = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        """Send what is queued at once (before the connection closes or bytes written around h2):
        the frames framed here, then what h2 queued since, then PING ACKs."""
        self._write_soon = False
        self._queued = 0
        out = self.h2.data_to_send()
        if self._out:
            self._out.append(out)
            out = b"".join(self._out)
            self._out.clear()
        if self._acks:
            out += b"".join(self._acks)
            self._acks.clear()
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
        they end. The frame is written directly (compat.goaway): h2's close_connection() would end the
        connection's state machine and fail every call still running."""
        if self.transport is None or self.transport.is_closing():
            return
        self._closing = True
        if self._started:
            self.write_now()
            self.transport.write(compat.goaway(self.h2.highest_inbound_stream_id))
        if not self.calls:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        self._handshake = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.calls:
            if not self.authenticated:  # calls that need no credentials: look again later
                self._handshake = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
            return
        log.debug("closing %s: no %s within %.0f s", self.peer if self._started else self.source,
                  "request" if self.server.authorize is None else "authorized call", HANDSHAKE_TIMEOUT)
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._started:
                self.write_now()  # what h2 queued (a response, a GOAWAY) leaves before the close
            self.transport.close()
