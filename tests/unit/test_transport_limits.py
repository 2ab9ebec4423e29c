"""xdsd.transport.GrpcServer against clients that try to exhaust it: calls refused before any of
their request bytes are kept, bounded request buffers (per call, per connection, per process),
connection limits (in all, per source) and whom they shed, the first-request deadline, and request
messages handed to handlers a bounded amount per loop iteration.

Raw HTTP/2 clients (h2) send what grpcio's client never would; every wait is bounded (``T``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

import xdsd.transport.connection as transport_connection
import xdsd.transport.server as transport_server
from tests.unit.test_transport import (
    ECHO,
    MB,
    RawH2,
    _read_until_eof,
    _stream,
    _stream_unary,
    bounded,
    channel,
    frame,
    path,
    serving,
    until,
)
from xdsd.transport.connection import FREE_WINDOW
from xdsd.transport.limits import ConnectionTable, source_of

T = 10.0
TOKEN = "good-token"
GOOD = (("x-xdsd-token", TOKEN),)
GOOD_HEADERS = [(b"x-xdsd-token", TOKEN.encode())]


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests() -> Iterator[None]:
    """As in test_transport: the cyclic collector runs between tests only."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if enabled:
            gc.enable()


def authorize(method: str, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> tuple[grpc.StatusCode, str] | None:
    """What the App passes: a valid token for every method but ``Public``."""
    if method.endswith("/Public"):
        return grpc.StatusCode.OK, "no credentials needed"
    if ("x-xdsd-token", TOKEN) in metadata:
        return None
    return grpc.StatusCode.UNAUTHENTICATED, "xdsd: missing-token: send a token in x-xdsd-token"


async def sink(requests: AsyncIterator[bytes], context: Any) -> bytes:
    """Reads every request (so a call given up for memory sees its status), answers how many."""
    n = 0
    async for _ in requests:
        n += 1
    return b"%d" % n


async def public(request: bytes, context: Any) -> bytes:
    return request


METHODS = {**ECHO, "Sink": _stream_unary(sink), "Public": grpc.unary_unary_rpc_method_handler(public)}


def rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Flooder:
    """One connection whose streams each declare a ``declared``-byte message and send ``body`` bytes
    of it, as fast as the server's windows allow (an h2 client honours flow control), or, with
    ``ignore_windows``, as fast as the socket takes frames (then the server ends the connection)."""

    def __init__(self, port: int, streams: int, declared: int, body: int, *, token: bool,
                 ignore_windows: bool = False, source: str = "127.0.0.1") -> None:
        self.port, self.streams, self.declared, self.body = port, streams, declared, body
        self.token, self.ignore_windows, self.source = token, ignore_windows, source
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.sent: dict[int, int] = {}
        self.status: dict[int, int | None] = {}
        self.reset: dict[int, int] = {}
        self.closed = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await bounded(asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0)))
        h2c = self.h2
        h2c.initiate_connection()
        for _ in range(self.streams):
            sid = h2c.get_next_available_stream_id()
            headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path("Sink").encode()),
                       (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
            h2c.send_headers(sid, headers + (GOOD_HEADERS if self.token else []))
            self.sent[sid] = 0
        self.writer.write(h2c.data_to_send())

    def _events(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", 0)
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                status = dict(event.headers).get(b"grpc-status")
                if status is not None:
                    self.status[sid] = int(status)
            elif isinstance(event, h2.events.StreamReset):
                self.reset[sid] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True

    def _send(self) -> int:
        """Queue what the windows allow; returns the bytes queued."""
        h2c, queued = self.h2, 0
        prefix = b"\0" + self.declared.to_bytes(4, "big")
        chunk = bytes(16384)
        for sid, sent in self.sent.items():
            if sent >= self.body or sid in self.reset or sid in self.status:
                continue
            try:
                room = 16384 if self.ignore_windows else min(h2c.local_flow_control_window(sid), 16384)
            except h2.exceptions.StreamClosedError:
                continue
            size = min(room, self.body - sent)
            if size <= 0:
                continue
            data = (prefix + chunk)[:size] if sent == 0 else chunk[:size]
            if self.ignore_windows:
                from hyperframe.frame import DataFrame
                assert self.writer is not None
                self.writer.write(DataFrame(sid, data).serialize())
            else:
                h2c.send_data(sid, data)
            self.sent[sid] = sent + size
            queued += size
        return queued

    async def run(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Send for ``seconds`` and then, if ``until`` is given, until it holds (at most 30 s more);
        or until everything is sent, refused or the connection ends."""
        assert self.reader is not None and self.writer is not None
        start = time.monotonic()

        def going() -> bool:
            elapsed = time.monotonic() - start
            return elapsed < seconds or (until is not None and not until() and elapsed < seconds + 30)

        try:
            while going() and not self.closed:
                queued = self._send()
                out = self.h2.data_to_send()
                if out:
                    self.writer.write(out)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.writer.drain(), 0.5)
                try:
                    data = await asyncio.wait_for(self.reader.read(1 << 16), 0.01 if queued else 0.1)
                except TimeoutError:
                    continue
                if not data:
                    self.closed = True
                    break
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._events(data)
        except (ConnectionError, OSError):
            self.closed = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- authorization at call start -----------------------------------------------------------------


async def test_a_refused_call_is_answered_at_once_and_its_request_never_buffered() -> None:
    async with serving(METHODS, authorize=authorize) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Sink"), end=False)
            client.h2.send_data(sid, b"\0" + (4 * MB).to_bytes(4, "big") + bytes(16_000))
            client.h2.send_data(sid, bytes(16_000))
            client.flush()
            response = await client.response(sid)
            assert response.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert b"missing-token" in response.headers[b"grpc-message"]
            assert response.reset == h2.errors.ErrorCodes.NO_ERROR  # RFC 9113 §8.1: stop sending
            (conn,) = running.server.connections
            assert not conn.authenticated and not conn.calls
            assert running.server.buffered == 0
            assert conn.h2.inbound_flow_control_window <= FREE_WINDOW
            # The same connection authenticates with a call that carries the token.
            sid = client.request(path("Echo"), body=frame(b"hello"), extra=GOOD_HEADERS)
            response = await client.response(sid)
            assert response.status == 0 and response.data == frame(b"hello")
            assert conn.authenticated
        finally:
            client.close()


async def test_grpcio_clients_with_and_without_a_token() -> None:
    async with serving(METHODS, authorize=authorize) as running, channel(running) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bounded(ch.unary_unary(path("Echo"))(b"x" * MB))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A method that needs no credentials runs, and leaves the connection unauthenticated.
        assert await bounded(ch.unary_unary(path("Public"))(b"p")) == b"p"
        (conn,) = running.server.connections
        assert not conn.authenticated
        # Messages larger than the unauthenticated allowance are refused on such a connection.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bounded(ch.unary_unary(path("Public"))(b"p" * 100_000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await bounded(ch.unary_unary(path("Echo"))(b"y" * MB, metadata=GOOD)) == b"y" * MB
        assert conn.authenticated
        assert await bounded(ch.unary_unary(path("Public"))(b"p" * 100_000)) == b"p" * 100_000


async def test_a_client_that_keeps_getting_refused_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """Refused calls count like stream resets (HTTP/2 rapid reset): past the burst, GOAWAY."""
    caplog.set_level("DEBUG", logger="xdsd.transport.connection")
    async with serving(METHODS, authorize=authorize) as running:
        client = await RawH2.open(running.port)
        try:
            for _ in range(transport_connection.CHURN_BURST + 300):
                client.request(path("Echo"), body=frame(b"x"))
            with contextlib.suppress(ConnectionError):
                await bounded(_read_until_eof(client.reader))
        finally:
            client.close()
        await until(lambda: not running.server.connections, "the connection to be dropped")
        assert "too many refused calls" in caplog.text


# -- finding: unauthenticated streams sending huge messages ---------------------------------------


async def test_unauthenticated_streams_sending_huge_messages_make_the_server_hold_nothing() -> None:
    """64 streams without a token, each sending 15 MiB of a declared 16 MiB message (the port's
    limit here, as the App had it): before, the server buffered every partial message (RSS +1.2 GB
    in 8 s). Now each call is refused at its HEADERS and its DATA dropped; the connection's window
    is not reopened past a small allowance, and a client that sends past its window is cut off.
    Meanwhile another, authenticated, client's calls go on."""
    async with serving(METHODS, authorize=authorize, max_receive_message_length=16 * MB) as running, \
            channel(running) as ch:
        server = running.server
        assert await bounded(ch.unary_unary(path("Echo"))(b"warm", metadata=GOOD)) == b"warm"
        before = rss()
        flooders = [Flooder(running.port, 16, 16 * MB, 15 * MB, token=False, ignore_windows=i % 2 == 1)
                    for i in range(4)]
        for f in flooders:
            await f.open()
        most = 0
        good = 0

        async def sample() -> None:
            nonlocal most
            while True:
                most = max(most, server.buffered)
                await asyncio.sleep(0.005)

        async def good_client() -> None:
            nonlocal good
            while True:
                assert await bounded(ch.unary_unary(path("Echo"))(b"ok %d" % good, metadata=GOOD)) == b"ok %d" % good
                good += 1
                await asyncio.sleep(0.02)

        sampler, goods = asyncio.create_task(sample()), asyncio.create_task(good_client())
        try:
            # The flood goes on (4 s at least) until the good client has had 5 calls answered.
            await bounded(asyncio.gather(*(f.run(4.0, until=lambda: good >= 5) for f in flooders)), 60)
            assert not goods.done()
        finally:
            sampler.cancel()
            goods.cancel()
            for f in flooders:
                f.close()
        grown = rss() - before
        assert most <= 64 * 1024, f"{most} request bytes held for refused calls"
        assert grown < 200 * MB, f"RSS grew {grown // MB} MiB"
        assert good >= 5
        compliant = flooders[0]
        assert set(compliant.status.values()) == {grpc.StatusCode.UNAUTHENTICATED.value[0]}
        assert sum(compliant.sent.values()) < 4 * MB, "the window kept opening for dropped requests"
        assert all(f.closed for f in flooders[1::2]), "a client ignoring flow control was not cut off"
        await until(lambda: len(server.connections) == 1, "the flooders' connections to be dropped")


async def test_authenticated_streams_with_huge_partial_messages_stay_within_the_buffers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same flood with a valid token: calls start, so bytes are held, but within the limits
    (a call: one message; a connection: max_connection_buffer; the process: max_buffered plus the
    first 64 KiB of each connection). Partial messages that stop making progress while others wait
    for buffer space are given up (RESOURCE_EXHAUSTED); another client's calls, small and large,
    keep succeeding."""
    monkeypatch.setattr(transport_server, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(transport_server, "WATCH_INTERVAL", 0.2)
    budget, per_connection = 40 * MB, 24 * MB
    async with serving(METHODS, authorize=authorize, max_receive_message_length=16 * MB,
                       max_connection_buffer=per_connection, max_buffered=budget) as running, \
            channel(running) as ch:
        server = running.server
        assert await bounded(ch.unary_unary(path("Echo"))(b"warm", metadata=GOOD)) == b"warm"
        before = rss()
        flooders = [Flooder(running.port, 16, 16 * MB, 15 * MB, token=True) for _ in range(4)]
        for f in flooders:
            await f.open()
        most, most_connection = 0, 0
        small = large = 0

        async def sample() -> None:
            nonlocal most, most_connection
            while True:
                most = max(most, server.buffered)
                most_connection = max([most_connection, *(c.partial + c.complete for c in server.connections)])
                await asyncio.sleep(0.005)

        async def good_client() -> None:
            nonlocal small, large
            request = bytes(range(256)) * 4096  # 1 MiB: more than a connection may hold for free
            while True:
                assert await bounded(ch.unary_unary(path("Echo"))(b"ok", metadata=GOOD)) == b"ok"
                small += 1
                if small % 10 == 0:
                    assert await bounded(ch.unary_unary(path("Echo"))(request, metadata=GOOD), 20) == request
                    large += 1
                await asyncio.sleep(0.02)

        sampler, goods = asyncio.create_task(sample()), asyncio.create_task(good_client())
        try:
            await bounded(asyncio.gather(*(f.run(5.0) for f in flooders)), 30)
            await until(lambda: large >= 2, "large calls to go through", 20)
            assert not goods.done()
        finally:
            sampler.cancel()
            goods.cancel()
        try:
            grown = rss() - before
            slack = 8 * FREE_WINDOW  # what 4+1 connections may send within their free windows
            assert most <= budget + slack, f"{most} bytes held, budget {budget}"
            assert most_connection <= per_connection
            assert grown < 3 * budget + 100 * MB, f"RSS grew {grown // MB} MiB"
            assert server.shed_messages > 0
            refused = [s for f in flooders for s in f.status.values()]
            assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
        finally:
            for f in flooders:
                f.close()
        await until(lambda: len(server.connections) == 1, "the flooders' connections to be dropped")
        await until(lambda: server.buffered == 0 and server.charged == 0, "the buffers to be given back")


async def test_a_large_message_completes_when_stalled_ones_hold_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partial messages whose clients stopped sending hold the whole process budget: a legitimate
    message larger than a connection's free window waits, the stalled ones are given up, and it
    completes (no deadlock)."""
    monkeypatch.setattr(transport_server, "STALL_SECONDS", 0.3)
    monkeypatch.setattr(transport_server, "WATCH_INTERVAL", 0.1)
    async with serving(METHODS, authorize=authorize, max_buffered=9 * MB) as running, channel(running) as ch:
        server = running.server
        stalled = [Flooder(running.port, 1, 4 * MB, 3 * MB, token=True) for _ in range(3)]
        try:
            for f in stalled:
                await f.open()
                await f.run(1.0)
            assert server.charged >= 8 * MB
            request = bytes(range(256)) * (12 * 1024)  # 3 MiB
            assert await bounded(ch.unary_unary(path("Echo"))(request, metadata=GOOD), 20) == request
            assert server.shed_messages >= 1
        finally:
            for f in stalled:
                f.close()


async def test_a_call_holds_at_most_its_share_and_a_message_larger_than_it_still_arrives() -> None:
    state_release = asyncio.Event()
    got: list[int] = []

    async def slow(requests: AsyncIterator[bytes], context: Any) -> bytes:
        await state_release.wait()
        async for r in requests:
            got.append(len(r))
        return b"%d" % len(got)

    async with serving({"Slow": _stream_unary(slow)}, authorize=authorize) as running, channel(running) as ch:
        call = ch.stream_unary(path("Slow"))(metadata=GOOD)
        big = bytes(3 * MB)

        async def write() -> None:
            for _ in range(3):
                await call.write(big)
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            await asyncio.sleep(1.0)
            (conn,) = running.server.connections
            (c,) = conn.calls.values()
            # One message (and what was left of its window) is as much as a call holds, however fast
            # the client writes.
            assert c.held <= 3 * MB + 64 * 1024
            state_release.set()
            assert await bounded(call, 30) == b"3"
            assert got == [3 * MB] * 3
        finally:
            writer.cancel()
            state_release.set()


# -- connections ----------------------------------------------------------------------------------


def test_source_of() -> None:
    assert source_of(("10.1.2.3", 5)) == "10.1.2.3"
    assert source_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    assert source_of(("2001:db8:1:2:3:4:5:6", 5, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:2:ffff::1", 5, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of("/run/sock") == "local" and source_of(None) == "local"


class _Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.was_shed = False

    def shed(self) -> None:
        self.was_shed = True

    def __repr__(self) -> str:
        return self.name


def test_connection_table_sheds_unauthenticated_then_idle_never_busy() -> None:
    now = [0.0]
    table: ConnectionTable[_Conn] = ConnectionTable(4, 2, clock=lambda: now[0])
    a1, a2, a3 = _Conn("a1"), _Conn("a2"), _Conn("a3")
    for c in (a1, a2):
        assert table.admit(c, "A")
    assert table.admit(a3, "A") and a1.was_shed  # per source: the oldest of the same source goes
    assert table.unauthenticated("A") == 2
    busy, idle = _Conn("busy"), _Conn("idle")
    assert table.admit(busy, "B") and table.admit(idle, "B")
    table.authenticated(busy, busy=True)
    table.authenticated(idle)
    assert table.unauthenticated("B") == 0
    b1 = _Conn("b1")
    assert table.admit(b1, "C") and a2.was_shed  # full: the oldest unauthenticated, whatever its source
    table.authenticated(b1, busy=True)
    b2 = _Conn("b2")
    assert table.admit(b2, "C") and a3.was_shed
    table.authenticated(b2, busy=True)
    c1 = _Conn("c1")
    assert table.admit(c1, "D") and idle.was_shed  # then an idle authenticated one
    table.authenticated(c1, busy=True)
    assert not table.admit(_Conn("refused"), "E")  # all authenticated and busy: refused
    assert not busy.was_shed and table.refused_count == 1
    table.idle(busy)
    assert table.admit(_Conn("late"), "E") and busy.was_shed
    assert len(table) == 4


async def test_the_xds_port_sheds_unauthenticated_connections_and_serves_authenticated_ones() -> None:
    """Thousands of idle connections (no request, or only refused ones) from one address do not keep
    an authenticated client out; the per-source limit leaves other sources alone."""
    async with serving(METHODS, authorize=authorize, max_connections=300, max_unauthenticated_per_source=50) \
            as running:
        server = running.server
        async with channel(running) as ch:
            held = ch.stream_stream(path("EchoStream"))(metadata=GOOD)  # an authenticated call in flight
            await bounded(held.write(b"a"))
            assert await bounded(held.read()) == b"a"
            idle = []
            for _ in range(400):  # from 127.0.0.2: at most 50 are kept
                idle.append(await bounded(asyncio.open_connection("127.0.0.1", running.port,
                                                                  local_addr=("127.0.0.2", 0))))
            await until(lambda: server.table.unauthenticated("127.0.0.2") <= 50, "the per-source limit")
            others = []
            for i in range(3, 9):  # 6 more sources, 50 each: the total (300) is reached
                for _ in range(50):
                    others.append(await bounded(asyncio.open_connection(
                        "127.0.0.1", running.port, local_addr=(f"127.0.0.{i}", 0))))
            await until(lambda: len(server.table) == 300, "the table to fill")
            try:
                # A new client still gets in (shedding the oldest unauthenticated connection), and the
                # authenticated call in flight is untouched.
                async with channel(running) as fresh:
                    assert await bounded(fresh.unary_unary(path("Echo"))(b"new", metadata=GOOD)) == b"new"
                await bounded(held.write(b"b"))
                assert await bounded(held.read()) == b"b"
                assert server.table.shed_count >= 350
                # The first 350 of 127.0.0.2's connections were shed for their source's limit (EOF).
                assert await bounded(_read_until_eof(idle[0][0])) is not None
            finally:
                for _, w in idle + others:
                    w.close()
            await bounded(held.done_writing())
            assert await bounded(held.code()) == grpc.StatusCode.OK


async def test_a_full_port_of_busy_authenticated_connections_refuses_new_ones() -> None:
    async with serving(METHODS, authorize=authorize, max_connections=3) as running:
        channels = [channel(running) for _ in range(3)]
        calls = []
        try:
            for ch in channels:
                call = ch.stream_stream(path("EchoStream"))(metadata=GOOD)
                await bounded(call.write(b"x"))
                assert await bounded(call.read()) == b"x"
                calls.append(call)
            reader, writer = await bounded(asyncio.open_connection("127.0.0.1", running.port))
            try:
                with contextlib.suppress(ConnectionError):
                    assert await bounded(_read_until_eof(reader)) == b""  # refused: closed at once
            finally:
                writer.close()
            for call in calls:  # nobody was shed
                await bounded(call.write(b"y"))
                assert await bounded(call.read()) == b"y"
            assert running.server.table.refused_count >= 1 and running.server.table.shed_count == 0
        finally:
            for call in calls:
                call.cancel()
            for ch in channels:
                await ch.close()


async def test_a_connection_without_an_authorized_call_is_closed_after_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_connection, "HANDSHAKE_TIMEOUT", 0.4)
    async with serving(METHODS, authorize=authorize) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Echo"), body=frame(b"x"))  # refused: the deadline still runs
            assert (await client.response(sid)).status == grpc.StatusCode.UNAUTHENTICATED.value[0]
            with contextlib.suppress(ConnectionError):
                await bounded(_read_until_eof(client.reader))
        finally:
            client.close()
        async with channel(running) as ch:  # an authenticated one stays, idle or not
            assert await bounded(ch.unary_unary(path("Echo"))(b"a", metadata=GOOD)) == b"a"
            await asyncio.sleep(0.8)
            assert await bounded(ch.unary_unary(path("Echo"))(b"b", metadata=GOOD)) == b"b"
            assert len(running.server.connections) == 1


# -- request messages handed to handlers ----------------------------------------------------------


async def test_large_messages_are_handed_to_handlers_a_few_per_loop_iteration() -> None:
    """Handlers parse what they read on the loop: eight 600 KB requests that arrive in one read are
    not all handed out in one loop iteration (bursts of DELIVERY_BYTES, at least one message)."""
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def record(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            seen.append(ticks)
            yield b"%d" % len(r)

    async with serving({"Record": _stream(record)}) as running:
        limit = running.server.delivery.burst
        client = await RawH2.open(running.port, window=16 * MB)
        ticking = asyncio.create_task(ticker())
        try:
            message = frame(bytes(600_000))
            sids = [client.request(path("Record"), end=False) for _ in range(8)]
            for sid in sids:  # all but the last byte of each: no message is complete yet
                rest = message[:-1]
                while rest:
                    room = min(client.h2.local_flow_control_window(sid), client.h2.max_outbound_frame_size)
                    if not room:
                        await client.pump()  # WINDOW_UPDATEs
                        continue
                    client.h2.send_data(sid, rest[:room])
                    rest = rest[room:]
                    client.flush()
            await until(lambda: sum(c.partial for conn in running.server.connections for c in conn.calls.values())
                        == 8 * (len(message) - 1), "the messages but their last bytes")
            for sid in sids:  # eight messages complete in one read
                client.h2.send_data(sid, message[-1:])
            client.flush()
            for sid in sids:
                while sid not in client.ended and not client.responses[sid].data:
                    await client.pump()
            per_tick: dict[int, int] = {}
            for t in seen:
                per_tick[t] = per_tick.get(t, 0) + 1
            assert len(seen) == 8
            assert max(per_tick.values()) <= limit // len(message) + 1, per_tick
        finally:
            ticking.cancel()
            client.close()


# -- the same under uvloop (what ``xdsd serve`` runs) ------------------------------------------------


UVLOOP_SCENARIOS = [
    test_a_refused_call_is_answered_at_once_and_its_request_never_buffered,
    test_grpcio_clients_with_and_without_a_token,
    test_a_large_message_completes_when_stalled_ones_hold_the_budget,
    test_a_full_port_of_busy_authenticated_connections_refuses_new_ones,
    test_large_messages_are_handed_to_handlers_a_few_per_loop_iteration,
]


@pytest.mark.parametrize("scenario", [pytest.param(fn, id=fn.__name__.removeprefix("test_"))
                                      for fn in UVLOOP_SCENARIOS])
def test_under_uvloop(scenario: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    kwargs = {"monkeypatch": monkeypatch} if "monkeypatch" in inspect.signature(scenario).parameters else {}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(**kwargs), 120))
