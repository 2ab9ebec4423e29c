"""One gRPC call on an HTTP/2 stream: the requests it reads, the messages it writes, its status.

gRPC over HTTP/2 (grpc/doc/PROTOCOL-HTTP2.md): a message is a 1-byte compressed flag, a 4-byte
big-endian length and the bytes; the response is HEADERS, DATA*, then trailers carrying
grpc-status and grpc-message (or one trailers-only HEADERS frame when nothing else was sent).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from xdsd.transport.context import ServicerContext

if TYPE_CHECKING:
    from xdsd.transport.connection import Connection

log = logging.getLogger(__name__)

# What one stream may hold in received bytes plus its open receive window (RFC 9113 §5.2): messages
# its handler has not read yet, and the message being received. Past it the stream's window is not
# reopened, so a client that writes faster than its handler reads is held by flow control. A message
# larger than this may still arrive whole: while one is being received the stream may hold it all
# (its size is at most the port's max_receive_message_length).
INBOX_LIMIT = 1 << 20
# What a received message costs in the inbox besides its bytes (a bytes object, a deque slot), counted
# against INBOX_LIMIT: 0-byte messages (5 bytes on the wire each) would otherwise count nothing.
MESSAGE_OVERHEAD = 64

_OK = grpc.StatusCode.OK


class CallError(Exception):
    """The request broke gRPC framing; the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Resolve a waiter that may be gone or already cancelled."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def grpc_message(details: str) -> bytes:
    """Percent-encode a status message (grpc-message: printable ASCII except '%' stays as is)."""
    raw = details.encode("utf-8")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


class Call:
    """State of one call. The connection feeds it; the handler task reads and writes through it."""

    __slots__ = (
        "conn", "stream_id", "handler", "metadata", "peer", "deadline", "task", "headers_sent", "finished",
        "cancelled", "expired", "_buf", "_inbox", "_inbox_bytes", "_need", "_eof", "_reader", "pending",
        "_drained", "_error", "_released", "progress", "turn", "open_since", "window",
    )

    def __init__(self, conn: Connection, stream_id: int, handler: grpc.RpcMethodHandler,
                 metadata: tuple[tuple[str, str | bytes], ...], peer: str, deadline: float | None) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.handler = handler
        self.metadata = metadata
        self.peer = peer
        self.deadline = deadline  # loop time, or None
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.finished = False
        self.cancelled = False
        self.expired = False
        self._buf = bytearray()  # bytes of a message not complete yet
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0  # what the inbox holds: its messages' bytes and MESSAGE_OVERHEAD each
        self._need = 0  # bytes still to come of the message in _buf, once its length prefix is in
        self._eof = False  # the client half-closed
        self._reader: asyncio.Future[None] | None = None
        self.pending: deque[bytes | memoryview] = deque()  # framed output waiting for window
        self._drained: asyncio.Future[None] | None = None
        self._error: CallError | None = None
        self._released = False  # the call is over: what it held was given back, new DATA is dropped
        self.progress = conn.loop.time()  # when request bytes last arrived (or the call started)
        self.turn = False  # granted a delivery turn by the server's DeliveryBudget, not used yet
        self.open_since = self.progress  # since when the stream's window has been open (not shut by us)
        # The stream's receive window as h2 counts it: SETTINGS_INITIAL_WINDOW_SIZE, in effect from
        # the connection's start (compat.replace_local_settings), less what arrived, plus what
        # ``grant`` opened.
        self.window = conn.server.stream_window

    @property
    def held(self) -> int:
        """Request bytes this call holds: the partial message and the unread ones."""
        return len(self._buf) + self._inbox_bytes

    @property
    def partial(self) -> int:
        return len(self._buf)

    # -- from the connection ---------------------------------------------------------------

    def feed(self, data: bytes, flow_controlled: int) -> None:
        """DATA for this stream: split it into messages and account what is held. The connection calls
        ``grant`` once it has fed every frame of a read (h2 has taken them all from the windows)."""
        self.window -= flow_controlled
        if self._error is not None or self._released:
            return  # dropped: it is not held, so the connection's window reopens for it
        conn = self.conn
        buf = self._buf
        partial, complete = len(buf), self._inbox_bytes
        max_message = conn.max_message
        if (not buf and len(data) >= 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
                and len(data) - 5 <= max_message):
            self._deliver(data[5:])  # the common case: exactly one whole message in the frame
        else:
            buf += data
            while len(buf) >= 5:
                size = int.from_bytes(buf[1:5], "big")
                if size > max_message:
                    self._error = CallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"Received message larger than max ({size} vs. {max_message})")
                    break
                if buf[0] != 0:
                    # Requests with a grpc-encoding are refused before any DATA is read.
                    self._error = CallError(grpc.StatusCode.INTERNAL, "compressed message without grpc-encoding")
                    break
                if len(buf) < 5 + size:
                    break
                self._deliver(bytes(buf[5:5 + size]))
                del buf[:5 + size]
            if self._error is not None:
                buf.clear()
                self._wake_reader()
        need = 5 + int.from_bytes(buf[1:5], "big") - len(buf) if len(buf) >= 5 else 0
        conn.account(len(buf) - partial, self._inbox_bytes - complete, need - self._need)
        self._need = need
        if buf:
            self.progress = conn.loop.time()

    def grant(self) -> bool:
        """Reopen this stream's window (RFC 9113 §6.9) so that what it holds plus what it may still be
        sent stays within INBOX_LIMIT, or within the whole message being received if that is larger.
        A stream at its limit gets no WINDOW_UPDATE: flow control holds its client, not our memory.
        True if a WINDOW_UPDATE was queued."""
        if self._error is not None or self._eof or self._released:
            return False
        conn = self.conn
        held = len(self._buf) + self._inbox_bytes
        limit = INBOX_LIMIT
        if self._need:
            limit = max(limit, len(self._buf) + self._need + MESSAGE_OVERHEAD)
        want = min(conn.server.stream_window, limit - held)
        window = self.window
        # Like h2's own window manager: an update once half the window is used, not one per frame.
        if want <= window or 2 * window > want:
            return False
        if window <= 0:
            self.open_since = conn.loop.time()
        if not conn.open_stream_window(self.stream_id, want - window):
            return False
        self.window = want
        return True

    def client_stopped(self, since: float) -> bool:
        """A partly received message that its client could have sent more of since ``since`` (both
        of its windows were open) and did not — as opposed to one waiting for us to open a window."""
        conn = self.conn
        return (self.progress <= since and self.open_since <= since and conn.open_since <= since
                and conn.h2.inbound_flow_control_window > 0 and self.window > 0)

    def _deliver(self, message: bytes) -> None:
        self._inbox.append(message)
        self._inbox_bytes += len(message) + MESSAGE_OVERHEAD
        self._wake_reader()

    def exhaust(self, details: str) -> None:
        """Give up the message being received (RESOURCE_EXHAUSTED): what it holds is freed now, the
        handler sees the status at its next read, and the call ends with it."""
        if self._error is not None or self._released:
            return
        buf = self._buf
        self.conn.account(-len(buf), 0, -self._need)
        buf.clear()
        self._need = 0
        self._error = CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        self._wake_reader()

    def release(self) -> None:
        """The call is over (ended, reset, or its connection gone): give back what it holds."""
        if self._released:
            return
        self._released = True
        self.conn.account(-len(self._buf), -self._inbox_bytes, -self._need)
        self._buf = bytearray()
        self._inbox.clear()
        self._inbox_bytes = 0
        self._need = 0

    def end_of_requests(self) -> None:
        self._eof = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        reader, self._reader = self._reader, None
        wake(reader)

    def window_opened(self) -> None:
        if self.pending:
            self.conn.flush(self)

    def drained(self) -> None:
        waiter, self._drained = self._drained, None
        wake(waiter)

    def abandon(self) -> None:
        """The client reset the stream or the connection is gone: stop the handler, send nothing."""
        if self.finished:
            return
        self.cancelled = True
        self.pending.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def expire(self) -> None:
        """The call's deadline (grpc-timeout) passed: stop the handler; it ends DEADLINE_EXCEEDED."""
        if self.finished or self.cancelled:
            return
        self.expired = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.conn.loop.time())

    # -- for the handler --------------------------------------------------------------------

    async def read(self) -> Any:
        """The next request (deserialized), or grpc.aio.EOF once the client half-closed. Messages are
        handed out under the server's DeliveryBudget: past it, the handler waits for a later loop
        iteration (its requests are deserialized and handled on the loop)."""
        while True:
            if self._error is not None:
                raise self._error
            inbox = self._inbox
            if inbox:
                delivery = self.conn.server.delivery
                if not delivery.take(self, len(inbox[0])):
                    await delivery.wait(self)
                    continue
                message = inbox.popleft()
                size = len(message) + MESSAGE_OVERHEAD
                self._inbox_bytes -= size
                conn = self.conn
                conn.account(0, -size, 0)
                # The stream's window may have been held for what it held; the connection's only if
                # it held half its limit (below that, refill left its client window to send with, and
                # the next DATA reopens it; a connection short of the budget is retried by the server).
                granted = self.grant()
                if 2 * (conn.partial + conn.complete + size) >= conn.buffer_limit:
                    granted |= conn.refill()
                if granted:
                    conn.write_out()
                deserialize = self.handler.request_deserializer
                if deserialize is None:
                    return message
                try:
                    return deserialize(message)
                except Exception as exc:
                    log.debug("cannot deserialize a request on %s: %s", self.handler, exc)
                    raise CallError(grpc.StatusCode.INTERNAL, "Exception deserializing request!") from exc
            if self._eof:
                return grpc.aio.EOF
            if self.cancelled:
                raise asyncio.CancelledError()
            waiter = self._reader = self.conn.loop.create_future()
            await waiter

    async def requests(self) -> AsyncIterator[Any]:
        while True:
            request = await self.read()
            if request is grpc.aio.EOF:
                return
            yield request

    def send_headers(self, metadata: tuple[tuple[str, str | bytes], ...] = (), *, now: bool = False) -> None:
        if not self.headers_sent:
            self.conn.send_headers(self.stream_id, metadata)  # ValueError: invalid metadata, nothing sent
            self.headers_sent = True
            if now:
                self.conn.write_out()

    async def write(self, message: Any) -> None:
        if self.finished or self.cancelled:
            raise asyncio.InvalidStateError("the call is over")
        if not self.headers_sent:
            self.send_headers()
        serialize = self.handler.response_serializer
        data = message if serialize is None else serialize(message)
        pending = self.pending
        pending.append(b"\0" + len(data).to_bytes(4, "big") + data)  # one DATA frame when it fits
        self.conn.flush(self)
        if pending:
            # The peer's window is closed: wait until it reads (HTTP/2 flow control, RFC 9113 §5.2).
            self._drained = waiter = self.conn.loop.create_future()
            await waiter
            if self.cancelled:
                raise asyncio.CancelledError()
        if self.conn.paused:
            await self.conn.writable()

    # -- running the handler ----------------------------------------------------------------

    async def run(self) -> None:
        context = ServicerContext(self, self.metadata)
        handler = self.handler
        code: grpc.StatusCode = _OK
        details = ""
        try:
            request: Any
            if handler.request_streaming:
                request = self.requests()
            else:
                request = await self.read()
                if request is grpc.aio.EOF:
                    raise CallError(grpc.StatusCode.INTERNAL, "Expected one request, got none")
            if handler.response_streaming:
                fn: Callable[..., Any] = handler.stream_stream if handler.request_streaming else handler.unary_stream
                result = fn(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await self.write(response)
                elif inspect.isawaitable(result):
                    await result
            else:
                fn = handler.stream_unary if handler.request_streaming else handler.unary_unary
                result = fn(request, context)
                if inspect.isawaitable(result):
                    result = await result
                if context.code() in (None, _OK):
                    if result is None:
                        raise CallError(grpc.StatusCode.INTERNAL, "the handler returned no response")
                    await self.write(result)
            code = context.code() or _OK
            details = context.details() or ""
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            details = context.details() or ""
        except CallError as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            if not self.expired:
                return  # the client is gone: nothing to answer
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception as exc:
            log.exception("gRPC handler for stream %d failed", self.stream_id)
            code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        error = self._error
        if error is not None and code is _OK:
            # Reading failed (a message over the limit, given up for memory) but the handler ended
            # without saying so: the call still ends with that status, as with grpcio's server.
            code, details = error.code, error.details
        try:
            if not self.cancelled:
                await self._finish(code, details, context.trailing_metadata())
        except asyncio.CancelledError:
            pass
        finally:
            context.run_done_callbacks()

    async def _finish(self, code: grpc.StatusCode, details: str,
                      trailing: tuple[tuple[str, str | bytes], ...]) -> None:
        if self.pending:
            self._drained = waiter = self.conn.loop.create_future()
            await waiter
            if self.cancelled:
                return
        self.finished = True
        self.conn.send_trailers(self, code, details, trailing, trailers_only=not self.headers_sent)
