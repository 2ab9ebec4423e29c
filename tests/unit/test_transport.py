"""xdsd.transport.GrpcServer (gRPC on h2, run by the event loop) against real grpcio clients in the
same process: framing, flow control both ways, status and metadata, deadlines, cancellation,
half-close, backpressure, graceful stop, TLS, and what a non-gRPC HTTP/2 peer gets.

Every wait is bounded (``T``): a bug fails a test instead of hanging it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import inspect
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import wrappers_pb2
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

import xdsd.transport.call as transport_call
import xdsd.transport.connection as transport_connection
from xdsd.transport import GrpcServer
from xdsd.transport.server import server_tls

T = 10.0  # the bound on every single wait; generous for a loaded 2-core machine
SERVICE = "t.Test"
MB = 1024 * 1024
# Own subchannel pool per channel: two channels never share a connection behind the test's back.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * MB),
    ("grpc.max_send_message_length", 64 * MB),
]


# -- scaffolding ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests() -> Iterator[None]:
    """No cyclic garbage collection during a test and its report; a full one after it.

    A task that died with an exception (a handler's, a client's) sits in a reference cycle; when the
    collector frees it, asyncio logs "Task exception was never retrieved" with its traceback, and
    Python 3.11 formats a traceback with ``ast.parse``. Should that happen while pytest itself is
    in ``ast.parse`` (formatting a failure, rewriting an import), 3.11 corrupts its parser state and
    pytest dies with INTERNALERROR "AST constructor recursion depth mismatch". So the collector runs
    here, at a safe point, only."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if enabled:
            gc.enable()


@dataclass
class Running:
    server: GrpcServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class State:
    """What handlers record for the test to look at."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    metadata: Any = None
    peer: str | None = None
    time_remaining: float | None = None
    written: int = 0
    received: list[Any] = field(default_factory=list)


def _unary(fn: Callable[..., Any], des: Any = None, ser: Any = None) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=des, response_serializer=ser)


def _unary_stream(fn: Callable[..., Any], des: Any = None, ser: Any = None) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(fn, request_deserializer=des, response_serializer=ser)


def _stream_unary(fn: Callable[..., Any], des: Any = None, ser: Any = None) -> grpc.RpcMethodHandler:
    return grpc.stream_unary_rpc_method_handler(fn, request_deserializer=des, response_serializer=ser)


def _stream(fn: Callable[..., Any], des: Any = None, ser: Any = None) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(fn, request_deserializer=des, response_serializer=ser)


@contextlib.asynccontextmanager
async def serving(methods: dict[str, grpc.RpcMethodHandler] | None = None, *, tls: Any = None,
                  register: Callable[[GrpcServer], None] | None = None, **options: Any) -> AsyncIterator[Running]:
    server = GrpcServer(**options)
    if methods is not None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    if register is not None:
        register(server)
    port = await server.listen("127.0.0.1", 0, tls)
    await server.start()
    try:
        yield Running(server, port)
    finally:
        await asyncio.wait_for(server.stop(0), T)


def channel(running: Running, *extra: tuple[str, Any]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(running.target, options=[*CHANNEL_OPTIONS, *extra])


async def bounded(aw: Awaitable[Any], timeout: float = T) -> Any:
    return await asyncio.wait_for(aw, timeout)


async def rpc_error(aw: Awaitable[Any], timeout: float = T) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(aw, timeout)
    return info.value


async def read_all(call: Any, timeout: float = T) -> list[Any]:
    """Every response of a streaming call (ends at its status; raises AioRpcError on an error status).
    With ``read()``, not ``async for``: grpc.aio does not allow mixing the two on one call."""
    async def drain() -> list[Any]:
        out = []
        while (message := await call.read()) is not grpc.aio.EOF:
            out.append(message)
        return out
    return await asyncio.wait_for(drain(), timeout)


async def until(predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stable(value: Callable[[], int], quiet: float = 0.5, timeout: float = T) -> int:
    """Wait until ``value()`` stops changing for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        now, current = time.monotonic(), value()
        if current != last:
            last, since = current, now
        elif now - since >= quiet:
            return current
        if now > deadline:
            raise AssertionError(f"value kept changing for {timeout} s (last {current})")


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def frame(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


# -- handlers shared by several tests ---------------------------------------------------------


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def digest(request: bytes, context: Any) -> bytes:
    return b"%d:" % len(request) + hashlib.sha256(request).digest()


def sized(request: bytes, context: Any) -> bytes:  # a plain function, not a coroutine: allowed too
    return random.Random(int(request)).randbytes(int(request))


ECHO = {"Echo": _unary(echo), "EchoStream": _stream(echo_stream), "Digest": _unary(digest),
        "Sized": _unary(sized)}


# -- messages both ways -----------------------------------------------------------------------


async def test_unary_echo_bytes() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        call = ch.unary_unary(path("Echo"))
        for message in (b"hello", b"", bytes(range(256)) * 100):
            assert await bounded(call(message)) == message
        unary = ch.unary_unary(path("Echo"))(b"x")
        assert await bounded(unary) == b"x"
        assert await unary.code() == grpc.StatusCode.OK
        assert await unary.details() in ("", None)


async def test_the_unspecified_ipv6_address_serves_both_families() -> None:
    """``--xds-address [::]:PORT`` listens on IPv4 and IPv6 alike, as grpcio's server did."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, ECHO),))
    port = await server.listen("::", 0)
    await server.start()
    try:
        for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
            async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
                assert await bounded(ch.unary_unary(path("Echo"))(b"both")) == b"both"
    finally:
        await asyncio.wait_for(server.stop(0), T)


async def test_stream_echo_many_messages_both_directions_interleaved() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        call = ch.stream_stream(path("EchoStream"))()
        sent = [b"m%d" % i + b"." * (i % 97) for i in range(2000)]

        async def writer() -> None:
            for message in sent:
                await call.write(message)
            await call.done_writing()

        task = asyncio.create_task(writer())
        got = await read_all(call, 30)
        await bounded(task)
        assert got == sent
        assert await call.code() == grpc.StatusCode.OK


async def test_lock_step_stream_echo() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        call = ch.stream_stream(path("EchoStream"))()
        for i in range(200):
            await bounded(call.write(b"%d" % i))
            assert await bounded(call.read()) == b"%d" % i
        await bounded(call.done_writing())
        assert await bounded(call.read()) is grpc.aio.EOF
        assert await bounded(call.code()) == grpc.StatusCode.OK


async def test_unary_stream_and_stream_unary_handlers() -> None:
    async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    async def join(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b",".join([r async for r in requests])

    async with serving({"Count": _unary_stream(count), "Join": _stream_unary(join)}) as running, \
            channel(running) as ch:
        assert await read_all(ch.unary_stream(path("Count"))(b"500")) == [b"%d" % i for i in range(500)]
        assert await read_all(ch.unary_stream(path("Count"))(b"0")) == []

        async def parts() -> AsyncIterator[bytes]:
            for p in (b"a", b"b", b"c"):
                yield p
        assert await bounded(ch.stream_unary(path("Join"))(parts())) == b"a,b,c"


async def test_handlers_that_write_through_the_context() -> None:
    """grpc.aio style: ``await context.write()`` / ``context.read()`` instead of yielding / iterating."""
    async def ping_pong(requests: AsyncIterator[bytes], context: Any) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                break
            await context.write(b"pong:" + request)
        await context.write(b"bye")

    async with serving({"PingPong": _stream(ping_pong)}) as running, channel(running) as ch:
        call = ch.stream_stream(path("PingPong"))()
        await bounded(call.write(b"1"))
        assert await bounded(call.read()) == b"pong:1"
        await bounded(call.write(b"2"))
        await bounded(call.done_writing())
        assert await read_all(call) == [b"pong:2", b"bye"]
        assert await call.code() == grpc.StatusCode.OK


async def test_protobuf_serializers_unary_and_stream() -> None:
    sv = wrappers_pb2.StringValue

    async def upper(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
        return sv(value=request.value.upper())

    async def upper_stream(requests: AsyncIterator[wrappers_pb2.StringValue], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield sv(value=request.value.upper())

    methods = {"Upper": _unary(upper, sv.FromString, sv.SerializeToString),
               "UpperStream": _stream(upper_stream, sv.FromString, sv.SerializeToString)}
    async with serving(methods) as running, channel(running) as ch:
        unary = ch.unary_unary(path("Upper"), request_serializer=sv.SerializeToString,
                               response_deserializer=sv.FromString)
        assert (await bounded(unary(sv(value="héllo")))).value == "HÉLLO"
        assert (await bounded(unary(sv()))).value == ""  # an empty message: zero bytes on the wire
        stream = ch.stream_stream(path("UpperStream"), request_serializer=sv.SerializeToString,
                                  response_deserializer=sv.FromString)()
        words = [f"w{i}" for i in range(300)]
        for w in words:
            await bounded(stream.write(sv(value=w)))
        await bounded(stream.done_writing())
        assert [r.value for r in await read_all(stream)] == [w.upper() for w in words]

        # A request its deserializer cannot parse: an error status (grpcio's sync server answers
        # INTERNAL, its aio server UNKNOWN), and the connection carries on.
        err = await rpc_error(ch.unary_unary(path("Upper"))(b"\xff\xff\xff"))
        assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        assert (await bounded(unary(sv(value="again")))).value == "AGAIN"


class _Csds(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):
    async def FetchClientStatus(self, request: Any, context: Any) -> Any:  # noqa: N802 (grpc's name)
        return csds_pb2.ClientStatusResponse(config=[csds_pb2.ClientConfig(node=request.node)])

    async def StreamClientStatus(self, requests: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for request in requests:
            yield csds_pb2.ClientStatusResponse(config=[csds_pb2.ClientConfig(node=request.node)])


async def test_generated_add_servicer_to_server_function() -> None:
    """Generated code registers through add_generic_rpc_handlers and add_registered_method_handlers."""
    def register(server: GrpcServer) -> None:
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(_Csds(), server)

    async with serving(register=register) as running, channel(running) as ch:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(ch)
        node = base_pb2.Node(id="n-1", cluster="c")
        reply = await bounded(stub.FetchClientStatus(csds_pb2.ClientStatusRequest(node=node)))
        assert reply.config[0].node == node
        stream = stub.StreamClientStatus()
        for i in range(20):
            await bounded(stream.write(csds_pb2.ClientStatusRequest(node=base_pb2.Node(id=f"n{i}"))))
            assert (await bounded(stream.read())).config[0].node.id == f"n{i}"
        await bounded(stream.done_writing())
        assert await bounded(stream.read()) is grpc.aio.EOF
        # A method of the same service that is not registered.
        err = await rpc_error(ch.unary_unary("/envoy.service.status.v3.ClientStatusDiscoveryService/Nope")(b""))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_concurrent_calls_share_one_connection() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        unary = ch.unary_unary(path("Echo"))

        async def streamer(n: int) -> list[bytes]:
            call = ch.stream_stream(path("EchoStream"))()
            out = []
            for i in range(100):
                await call.write(b"%d-%d" % (n, i))
                out.append(await call.read())
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return out

        results = await bounded(asyncio.gather(
            *(unary(b"u%d" % i) for i in range(100)), *(streamer(n) for n in range(10))), 60)
        assert results[:100] == [b"u%d" % i for i in range(100)]
        for n, got in enumerate(results[100:]):
            assert got == [b"%d-%d" % (n, i) for i in range(100)]
        assert len(running.server.connections) == 1


async def test_many_channels_each_their_connection() -> None:
    async with serving(ECHO) as running:
        channels = [channel(running) for _ in range(20)]
        try:
            async def use(i: int, ch: grpc.aio.Channel) -> list[bytes]:
                return list(await asyncio.gather(*(ch.unary_unary(path("Echo"))(b"%d.%d" % (i, j))
                                                   for j in range(5))))
            got = await bounded(asyncio.gather(*(use(i, ch) for i, ch in enumerate(channels))), 60)
            assert got == [[b"%d.%d" % (i, j) for j in range(5)] for i in range(20)]
            assert len(running.server.connections) == 20
        finally:
            for ch in channels:
                await ch.close()
        # Closed channels: the server forgets their connections.
        await until(lambda: not running.server.connections, "the server to drop closed connections")


async def test_more_concurrent_calls_than_max_concurrent_streams() -> None:
    """The client queues calls past SETTINGS_MAX_CONCURRENT_STREAMS; every call completes."""
    active = 0
    peak = 0

    async def slow(request: bytes, context: Any) -> bytes:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.05)
        finally:
            active -= 1
        return request

    async with serving({"Slow": _unary(slow)}, max_concurrent_streams=4) as running, channel(running) as ch:
        call = ch.unary_unary(path("Slow"))
        got = await bounded(asyncio.gather(*(call(b"%d" % i) for i in range(24))), 30)
        assert got == [b"%d" % i for i in range(24)]
        assert 1 <= peak <= 4


# -- larger than the windows ------------------------------------------------------------------


async def test_response_larger_than_every_window_arrives_whole() -> None:
    async with serving(ECHO, stream_window=64 * 1024) as running, channel(running) as ch:
        size = 5 * MB
        got = await bounded(ch.unary_unary(path("Sized"))(b"%d" % size), 30)
        assert got == random.Random(size).randbytes(size)


async def test_several_large_responses_on_one_stream() -> None:
    async def big_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(4):
            yield random.Random(i).randbytes(3 * MB)

    async with serving({"Big": _unary_stream(big_stream)}) as running, channel(running) as ch:
        got = await read_all(ch.unary_stream(path("Big"))(b""), 60)
        assert [hashlib.sha256(g).digest() for g in got] == [
            hashlib.sha256(random.Random(i).randbytes(3 * MB)).digest() for i in range(4)]


async def test_request_larger_than_the_window_but_under_the_limit_arrives_whole() -> None:
    async with serving(ECHO, stream_window=256 * 1024) as running, channel(running) as ch:
        request = random.Random(7).randbytes(3 * MB + 17)  # > stream and connection windows, < 4 MB
        got = await bounded(ch.unary_unary(path("Digest"))(request), 30)
        assert got == b"%d:" % len(request) + hashlib.sha256(request).digest()
        # The same on a stream, twice in a row, and a small one after.
        call = ch.stream_stream(path("EchoStream"))()
        for message in (request, request[::-1], b"small"):
            await bounded(call.write(message), 30)
            assert await bounded(call.read(), 30) == message
        await bounded(call.done_writing())
        assert await bounded(call.code()) == grpc.StatusCode.OK


async def test_request_above_max_receive_message_length_is_resource_exhausted() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("Digest"))(b"x" * (5 * MB)), 30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection carries on.
        assert await bounded(ch.unary_unary(path("Echo"))(b"after")) == b"after"
        # On a stream: accepted messages first, then the oversized one ends the call.
        call = ch.stream_stream(path("EchoStream"))()
        await bounded(call.write(b"ok"))
        assert await bounded(call.read()) == b"ok"
        await bounded(call.write(b"y" * (4 * MB + 1)), 30)
        err = await rpc_error(call.read(), 30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(running.server.connections) == 1


async def test_max_receive_message_length_below_one_frame_is_enforced() -> None:
    """A limit smaller than a DATA frame (16 KiB): a 4 KiB message arrives in one frame."""
    async with serving(ECHO, max_receive_message_length=1024) as running, channel(running) as ch:
        assert await bounded(ch.unary_unary(path("Echo"))(b"a" * 1000)) == b"a" * 1000
        err = await rpc_error(ch.unary_unary(path("Echo"))(b"b" * 4096))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_max_receive_message_length_is_inclusive() -> None:
    async with serving(ECHO, max_receive_message_length=100_000) as running, channel(running) as ch:
        assert await bounded(ch.unary_unary(path("Digest"))(b"a" * 100_000)) == \
            b"100000:" + hashlib.sha256(b"a" * 100_000).digest()
        err = await rpc_error(ch.unary_unary(path("Digest"))(b"a" * 100_001))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_small_stream_window_many_window_updates() -> None:
    async with serving(ECHO, stream_window=16 * 1024) as running, channel(running) as ch:
        request = random.Random(11).randbytes(MB + 3)
        assert await bounded(ch.unary_unary(path("Digest"))(request), 30) == \
            b"%d:" % len(request) + hashlib.sha256(request).digest()
        call = ch.stream_stream(path("EchoStream"))()
        for i in range(20):
            message = random.Random(i).randbytes(40_000 + i)
            await bounded(call.write(message))
            assert await bounded(call.read()) == message
        await bounded(call.done_writing())
        assert await bounded(call.code()) == grpc.StatusCode.OK


async def test_connection_window_at_the_http2_default(caplog: pytest.LogCaptureFixture) -> None:
    async with serving(ECHO, connection_window=65_535) as running, channel(running) as ch:
        request = random.Random(12).randbytes(300_000)
        assert await bounded(ch.unary_unary(path("Digest"))(request)) == \
            b"%d:" % len(request) + hashlib.sha256(request).digest()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- status -----------------------------------------------------------------------------------


async def test_unknown_method_and_unknown_service_are_unimplemented() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        for p in (path("Nope"), "/other.Service/Echo", "/weird"):
            err = await rpc_error(ch.unary_unary(p)(b"x"))
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, p
        call = ch.stream_stream(path("Nope"))()
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        # Handlers added later are found, even for a path looked up (and missed) before.
        running.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"Nope": _unary(echo)}),))
        assert await bounded(ch.unary_unary(path("Nope"))(b"now")) == b"now"


DETAILS = "nö wäy: 100% ✓ — 50%25 %zz\tend"  # non-ASCII, '%', something that looks percent-encoded


@pytest.mark.parametrize("details", [DETAILS, "plain ascii", "%", "", "日本語"])
async def test_abort_code_and_details_round_trip(details: str) -> None:
    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, details)
        raise AssertionError("abort returned")

    async def abort_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, details)

    async with serving({"Abort": _unary(abort), "AbortStream": _stream(abort_stream)}) as running, \
            channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("Abort"))(b""))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == details
        # After a response message: status in trailers rather than a trailers-only response.
        call = ch.stream_stream(path("AbortStream"))()
        await bounded(call.write(b"one"))
        assert await bounded(call.read()) == b"one"
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == details


async def test_abort_with_trailing_metadata() -> None:
    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "gone", (("x-why", "because"),))
        raise AssertionError("abort returned")

    async with serving({"Abort": _unary(abort)}) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("Abort"))(b""))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "gone"
        assert ("x-why", "because") in tuple(err.trailing_metadata())


async def test_set_code_and_details_then_return() -> None:
    async def not_found(request: bytes, context: Any) -> None:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no such thing: 5%")
        return None

    async def stream_not_found(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"partial"
        context.set_code(grpc.StatusCode.OUT_OF_RANGE)
        context.set_details("stopped")

    async def ok_with_details(request: bytes, context: Any) -> bytes:
        context.set_details("all good")
        return b"fine"

    methods = {"NotFound": _unary(not_found), "StreamNotFound": _unary_stream(stream_not_found),
               "OkDetails": _unary(ok_with_details)}
    async with serving(methods) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("NotFound"))(b""))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "no such thing: 5%"
        call = ch.unary_stream(path("StreamNotFound"))(b"")
        assert await bounded(call.read()) == b"partial"
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        assert err.details() == "stopped"
        call2 = ch.unary_unary(path("OkDetails"))(b"")
        assert await bounded(call2) == b"fine"
        assert await call2.code() == grpc.StatusCode.OK


async def test_handler_exception_is_unknown_and_the_connection_carries_on() -> None:
    async def boom(request: bytes, context: Any) -> bytes:
        raise ValueError("kaput")

    async def boom_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request
            raise RuntimeError("kaput later")

    async def none(request: bytes, context: Any) -> None:
        return None

    methods = {"Boom": _unary(boom), "BoomStream": _stream(boom_stream), "None": _unary(none), **ECHO}
    async with serving(methods) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("Boom"))(b""))
        assert err.code() == grpc.StatusCode.UNKNOWN
        call = ch.stream_stream(path("BoomStream"))()
        await bounded(call.write(b"a"))
        assert await bounded(call.read()) == b"a"
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.UNKNOWN
        # A unary handler that returns nothing (and set no error code) is an error, not an empty OK.
        err = await rpc_error(ch.unary_unary(path("None"))(b""))
        assert err.code() != grpc.StatusCode.OK
        assert await bounded(ch.unary_unary(path("Echo"))(b"still here")) == b"still here"
        assert len(running.server.connections) == 1


async def test_trailing_and_initial_metadata_reach_the_client() -> None:
    async def with_metadata(request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata((("x-initial", "first"), ("x-initial-bin", b"\x00\x01\xfe")))
        context.set_trailing_metadata((("x-trailer", "last"), ("x-trailer-bin", b"\xff\x00"),
                                       ("x-count", "3")))
        return b"body"

    async def trailers_only(request: bytes, context: Any) -> None:
        context.set_trailing_metadata((("x-reason", "quota"),))
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def stream_trailers(request: bytes, context: Any) -> AsyncIterator[bytes]:
        context.set_trailing_metadata((("x-stream-end", "yes"),))
        yield b"a"
        yield b"b"

    methods = {"Md": _unary(with_metadata), "TrailersOnly": _unary(trailers_only),
               "StreamMd": _unary_stream(stream_trailers)}
    async with serving(methods) as running, channel(running) as ch:
        call = ch.unary_unary(path("Md"))(b"")
        assert await bounded(call) == b"body"
        initial = tuple(await call.initial_metadata())
        assert ("x-initial", "first") in initial
        assert ("x-initial-bin", b"\x00\x01\xfe") in initial
        trailing = tuple(await call.trailing_metadata())
        assert ("x-trailer", "last") in trailing
        assert ("x-trailer-bin", b"\xff\x00") in trailing
        assert ("x-count", "3") in trailing

        err = await rpc_error(ch.unary_unary(path("TrailersOnly"))(b""))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("x-reason", "quota") in tuple(err.trailing_metadata())

        stream = ch.unary_stream(path("StreamMd"))(b"")
        assert await read_all(stream) == [b"a", b"b"]
        assert ("x-stream-end", "yes") in tuple(await stream.trailing_metadata())


async def test_trailing_metadata_that_cannot_be_sent_still_ends_the_call() -> None:
    """A value HTTP/2 cannot carry (not Latin-1): the client must get a status, not wait forever."""
    async def bad_metadata(request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-bad", "snow ☃"),))
        return b"body"

    async with serving({"Bad": _unary(bad_metadata), **ECHO}) as running, channel(running) as ch:
        call = ch.unary_unary(path("Bad"))(b"")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await bounded(call, 5)
        assert await bounded(call.code(), 5) is not None
        assert await bounded(ch.unary_unary(path("Echo"))(b"x")) == b"x"


# -- what the handler sees --------------------------------------------------------------------


async def test_invocation_metadata_and_peer() -> None:
    state = State()

    async def look(request: bytes, context: Any) -> bytes:
        state.metadata = tuple(context.invocation_metadata())
        state.peer = context.peer()
        state.time_remaining = context.time_remaining()
        return b""

    async with serving({"Look": _unary(look)}) as running, channel(running) as ch:
        metadata = (("x-plain", "value 1"), ("x-bin", b"\x00\xff\x10 binary"), ("x-plain", "value 2"),
                    ("x-empty-bin", b""))
        await bounded(ch.unary_unary(path("Look"))(b"", metadata=metadata, timeout=30))
        md = state.metadata
        assert ("x-plain", "value 1") in md
        assert ("x-plain", "value 2") in md
        assert md.index(("x-plain", "value 1")) < md.index(("x-plain", "value 2"))
        assert ("x-bin", b"\x00\xff\x10 binary") in md
        assert ("x-empty-bin", b"") in md
        keys = {k for k, _ in md}
        assert not keys & {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
        assert not any(k.startswith(":") for k in keys)
        for key, value in md:
            assert isinstance(value, bytes) if key.endswith("-bin") else isinstance(value, str), (key, value)
        assert re.fullmatch(r"ipv4:127\.0\.0\.1:\d+", state.peer or ""), state.peer
        assert int(state.peer.rsplit(":", 1)[1]) != running.port  # the client's port, not ours
        assert state.time_remaining is not None and 20 < state.time_remaining <= 30

        # No deadline: no time limit.
        await bounded(ch.unary_unary(path("Look"))(b""))
        assert state.time_remaining is None


async def test_context_cancelled_and_done() -> None:
    state = State()
    seen: dict[str, bool] = {}
    contexts: list[Any] = []

    async def watch(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        contexts.append(context)
        seen["cancelled_at_start"] = context.cancelled()
        seen["done_at_start"] = context.done()
        state.started.set()
        try:
            async for request in requests:
                yield request
        finally:
            state.ended.set()

    async with serving({"Watch": _stream(watch)}) as running, channel(running) as ch:
        call = ch.stream_stream(path("Watch"))()
        await bounded(call.write(b"a"))
        assert await bounded(call.read()) == b"a"
        call.cancel()
        await bounded(state.ended.wait())
        # (grpc.aio's own context never reports this one: stricter than grpcio, as documented.)
        await until(lambda: contexts[0].cancelled(), "context.cancelled()")
    assert seen == {"cancelled_at_start": False, "done_at_start": False}


GRPC_AIO_CONTEXT = sorted(n for n in dir(grpc.aio.ServicerContext) if not n.startswith("_"))


async def test_servicer_context_has_grpc_aio_methods() -> None:
    contexts: list[Any] = []

    async def keep(request: bytes, context: Any) -> bytes:
        contexts.append(context)
        return b""

    async with serving({"Keep": _unary(keep)}) as running, channel(running) as ch:
        await bounded(ch.unary_unary(path("Keep"))(b""))
    missing = [n for n in GRPC_AIO_CONTEXT if not callable(getattr(contexts[0], n, None))]
    assert missing == []


async def test_handler_reading_back_its_code_and_details() -> None:
    async def read_back(request: bytes, context: Any) -> None:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("missing")
        assert context.code() == grpc.StatusCode.NOT_FOUND
        assert context.details() == "missing"

    async with serving({"ReadBack": _unary(read_back)}) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("ReadBack"))(b""))
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "missing")


# -- deadlines and cancellation ---------------------------------------------------------------


async def test_deadline_exceeded_cancels_the_handler() -> None:
    state = State()

    async def sleepy(request: bytes, context: Any) -> bytes:
        state.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        finally:
            state.ended.set()
        return b"late"

    async with serving({"Sleep": _unary(sleepy), **ECHO}) as running, channel(running) as ch:
        # Bounded at T, far below the handler's 60 s: the deadline ended the call, not the handler.
        err = await rpc_error(ch.unary_unary(path("Sleep"))(b"", timeout=0.2))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await bounded(state.ended.wait())
        assert state.cancelled.is_set()
        await until(lambda: not any(c.calls for c in running.server.connections), "the call to be forgotten")
        assert await bounded(ch.unary_unary(path("Echo"))(b"x")) == b"x"


async def test_deadline_on_a_stream_cancels_the_handler() -> None:
    state = State()

    async def hang(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                yield request
        finally:
            state.ended.set()

    async with serving({"Hang": _stream(hang)}) as running, channel(running) as ch:
        call = ch.stream_stream(path("Hang"))(timeout=0.5)
        await bounded(call.write(b"one"))
        assert await bounded(call.read()) == b"one"
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await bounded(state.ended.wait())


async def test_server_side_deadline_without_the_client_enforcing_it() -> None:
    """The server's own timer (grpc-timeout) ends the call DEADLINE_EXCEEDED: a raw h2 client that
    sends grpc-timeout but never resets the stream still gets the status."""
    state = State()

    async def sleepy(request: bytes, context: Any) -> bytes:
        try:
            await asyncio.sleep(60)
        finally:
            state.ended.set()
        return b""

    async with serving({"Sleep": _unary(sleepy)}) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Sleep"), extra=[(b"grpc-timeout", b"200m")], body=frame(b""))
            response = await client.response(sid)
            assert response.headers.get(b":status") == b"200"
            assert response.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            await bounded(state.ended.wait())
        finally:
            client.close()


async def test_client_cancel_cancels_the_handler_and_the_connection_keeps_serving() -> None:
    state = State()

    async def watched(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        state.started.set()
        try:
            async for request in requests:
                yield request
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        finally:
            state.ended.set()

    async with serving({"Watched": _stream(watched), **ECHO}) as running, channel(running) as ch:
        call = ch.stream_stream(path("Watched"))()
        await bounded(call.write(b"a"))
        assert await bounded(call.read()) == b"a"
        call.cancel()
        await bounded(state.ended.wait(), 5)
        assert state.cancelled.is_set()
        assert call.cancelled()
        await until(lambda: not any(c.calls for c in running.server.connections), "the call to be forgotten")
        # The same connection serves the next calls.
        assert await bounded(ch.unary_unary(path("Echo"))(b"next")) == b"next"
        again = ch.stream_stream(path("EchoStream"))()
        await bounded(again.write(b"b"))
        assert await bounded(again.read()) == b"b"
        await bounded(again.done_writing())
        assert await bounded(again.read()) is grpc.aio.EOF
        assert len(running.server.connections) == 1


async def test_cancel_while_the_handler_waits_on_flow_control() -> None:
    """A handler blocked in write (the client does not read) is cancelled when the client cancels."""
    state = State()

    async def flood(request: bytes, context: Any) -> AsyncIterator[bytes]:
        chunk = b"z" * 65536
        try:
            while True:
                yield chunk
                state.written += 1
        finally:
            state.ended.set()

    async with serving({"Flood": _unary_stream(flood), **ECHO}) as running, channel(running) as ch:
        call = ch.unary_stream(path("Flood"))(b"")
        assert len(await bounded(call.read())) == 65536
        await stable(lambda: state.written)
        call.cancel()
        await bounded(state.ended.wait())
        assert await bounded(ch.unary_unary(path("Echo"))(b"next")) == b"next"


async def test_closing_the_channel_cancels_the_handlers() -> None:
    state = State()

    async def watched(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                yield request
        finally:
            state.ended.set()

    async with serving({"Watched": _stream(watched)}) as running:
        ch = channel(running)
        call = ch.stream_stream(path("Watched"))()
        await bounded(call.write(b"a"))
        assert await bounded(call.read()) == b"a"
        await bounded(ch.close())
        await bounded(state.ended.wait())
        # (Whether the TCP connection closes now is up to grpcio: it keeps it while ``call`` lives.)


async def test_client_keepalive_pings_are_answered() -> None:
    """xDS clients ping idle connections (keepalive); the server answers, the stream carries on."""
    options = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 2000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    async with serving(ECHO) as running, channel(running, *options) as ch:
        call = ch.stream_stream(path("EchoStream"))()
        await bounded(call.write(b"a"))
        assert await bounded(call.read()) == b"a"
        await asyncio.sleep(1.5)  # several pings, and their acks
        await bounded(call.write(b"b"))
        assert await bounded(call.read()) == b"b"
        await bounded(call.done_writing())
        assert await bounded(call.code()) == grpc.StatusCode.OK
        assert len(running.server.connections) == 1


# -- compression ------------------------------------------------------------------------------


async def test_gzip_request_gets_a_clean_error_status() -> None:
    async with serving(ECHO) as running, channel(running) as ch:
        err = await rpc_error(ch.unary_unary(path("Echo"))(b"x" * 1000, compression=grpc.Compression.Gzip))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        # A stream: refused on its headers (grpc-encoding), before any message.
        call = ch.stream_stream(path("EchoStream"))(compression=grpc.Compression.Gzip)
        err = await rpc_error(call.read())
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        # Writing at once: grpcio's client may lose the race with the server's early status (its
        # write fails and it reports its own INTERNAL "Internal error from Core", as it does with
        # grpcio's server); either way the call ends, promptly.
        call = ch.stream_stream(path("EchoStream"))(compression=grpc.Compression.Gzip)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await bounded(call.write(b"y" * 1000))
        err = await rpc_error(call.read())
        assert err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)
        # Uncompressed calls on the same connection still work.
        assert await bounded(ch.unary_unary(path("Echo"))(b"plain")) == b"plain"


async def test_gzip_channel_default_compression() -> None:
    async with serving(ECHO) as running, \
            grpc.aio.insecure_channel(running.target, options=CHANNEL_OPTIONS,
                                      compression=grpc.Compression.Gzip) as ch:
        err = await rpc_error(ch.unary_unary(path("Echo"))(b"x" * 1000))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# -- half-close -------------------------------------------------------------------------------


async def test_half_close_ends_the_request_iterator_and_the_handler_still_writes() -> None:
    state = State()

    async def tally(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            state.received.append(request)
            yield b"ack:" + request
        state.ended.set()  # the iterator ended: the client half-closed
        await asyncio.sleep(0.05)
        yield b"total:%d" % len(state.received)
        for i in range(3):
            yield b"late:%d" % i

    async with serving({"Tally": _stream(tally)}) as running, channel(running) as ch:
        call = ch.stream_stream(path("Tally"))()
        for r in (b"a", b"b", b"c"):
            await bounded(call.write(r))
        assert [await bounded(call.read()) for _ in range(3)] == [b"ack:a", b"ack:b", b"ack:c"]
        assert not state.ended.is_set()
        await bounded(call.done_writing())
        await bounded(state.ended.wait())
        assert await read_all(call) == [b"total:3", b"late:0", b"late:1", b"late:2"]
        assert await call.code() == grpc.StatusCode.OK


async def test_handler_ending_before_the_client_half_closes() -> None:
    """The server ends the call (status OK) while the client still has its side open."""
    async def first_only(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"got:" + request
            return

    async with serving({"First": _stream(first_only), **ECHO}) as running, channel(running) as ch:
        call = ch.stream_stream(path("First"))()
        await bounded(call.write(b"1"))
        assert await bounded(call.read()) == b"got:1"
        assert await bounded(call.read()) is grpc.aio.EOF
        assert await bounded(call.code()) == grpc.StatusCode.OK
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await bounded(call.write(b"2"))  # too late: fails or is dropped, but does not hang
        assert await bounded(ch.unary_unary(path("Echo"))(b"x")) == b"x"


async def test_half_close_with_no_requests_at_all() -> None:
    async def count(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        n = 0
        async for _ in requests:
            n += 1
        yield b"%d" % n

    async with serving({"Count": _stream(count)}) as running, channel(running) as ch:
        call = ch.stream_stream(path("Count"))()
        await bounded(call.done_writing())
        assert await read_all(call) == [b"0"]


# -- backpressure -----------------------------------------------------------------------------


async def test_server_writes_wait_for_a_client_that_does_not_read() -> None:
    state = State()
    chunk = 64 * 1024
    total = 1000  # 64 MB: far more than any window the client opens

    async def flood(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(total):
            yield i.to_bytes(4, "big") + b"f" * (chunk - 4)
            state.written += 1
        state.ended.set()

    async with serving({"Flood": _unary_stream(flood)}) as running, channel(running) as ch:
        call = ch.unary_stream(path("Flood"))(b"")
        await bounded(until(lambda: state.written > 0, "the first write"))
        written = await stable(lambda: state.written, quiet=1.0, timeout=30)
        assert written < total // 2, f"{written} of {total} messages written to a client that reads nothing"
        assert not state.ended.is_set()
        # No more than the windows' worth waits in the server (flow control, not a private buffer).
        for conn in running.server.connections:
            for c in conn.calls.values():
                assert sum(len(p) for p in c.pending) <= 2 * chunk
        got = 0
        while (message := await bounded(call.read())) is not grpc.aio.EOF:
            assert int.from_bytes(message[:4], "big") == got
            assert len(message) == chunk
            got += 1
            if got % 100 == 0:
                await asyncio.sleep(0)
        assert got == total
        assert state.ended.is_set()


async def test_client_streaming_faster_than_the_handler_reads_is_held_by_flow_control() -> None:
    """The client writes 32 MB while the handler reads nothing: its writes wait (grpc.aio's write
    awaits flow control); when the handler reads, everything arrives in order."""
    state = State()
    chunk = 256 * 1024
    total = 128

    async def slow_reader(requests: AsyncIterator[bytes], context: Any) -> bytes:
        await state.release.wait()
        n = 0
        async for request in requests:
            assert int.from_bytes(request[:4], "big") == n
            n += 1
        return b"%d" % n

    async with serving({"Slow": _stream_unary(slow_reader)}) as running, channel(running) as ch:
        call = ch.stream_unary(path("Slow"))()
        sent = 0

        async def writer() -> None:
            nonlocal sent
            for i in range(total):
                await call.write(i.to_bytes(4, "big") + b"r" * (chunk - 4))
                sent += 1
            await call.done_writing()

        task = asyncio.create_task(writer())
        try:
            held = await stable(lambda: sent, quiet=1.0, timeout=30)
            assert held < total, "the client wrote everything although the server read nothing"
            buffered = sum(c._inbox_bytes + len(c._buf) for conn in running.server.connections
                           for c in conn.calls.values())
            assert buffered <= 8 * MB, f"{buffered} bytes held by the server for an idle handler"
            state.release.set()
            assert await bounded(call, 60) == b"%d" % total
            await bounded(task)
        finally:
            task.cancel()


async def test_one_stalled_stream_does_not_block_others_on_the_connection() -> None:
    state = State()

    async def stalled(requests: AsyncIterator[bytes], context: Any) -> bytes:
        await state.release.wait()
        return b"done"

    async with serving({"Stalled": _stream_unary(stalled), **ECHO}) as running, channel(running) as ch:
        stuck = ch.stream_unary(path("Stalled"))()

        async def fill() -> None:
            for _ in range(64):
                await stuck.write(b"s" * 256 * 1024)

        filler = asyncio.create_task(fill())
        try:
            await asyncio.sleep(1.0)
            request = random.Random(3).randbytes(2 * MB)
            assert await bounded(ch.unary_unary(path("Digest"))(request), 20) == \
                b"%d:" % len(request) + hashlib.sha256(request).digest()
        finally:
            state.release.set()
            filler.cancel()
            stuck.cancel()


async def test_many_stalled_streams_do_not_starve_the_connection() -> None:
    release = asyncio.Event()
    streams = 12

    async def stalled(requests: AsyncIterator[bytes], context: Any) -> bytes:
        await release.wait()
        return b"%d" % len([r async for r in requests])

    async with serving({"Stalled": _stream_unary(stalled), **ECHO}, connection_window=4 * MB) as running, \
            channel(running) as ch:
        calls = [ch.stream_unary(path("Stalled"))() for _ in range(streams)]
        sent = 0

        async def fill(call: Any) -> None:
            nonlocal sent
            for _ in range(12):
                await call.write(b"s" * 256 * 1024)
                sent += 1

        def received() -> int:  # bytes the server holds for the stalled handlers
            return sum(c.held for conn in running.server.connections for c in conn.calls.values())

        fillers = [asyncio.create_task(fill(c)) for c in calls]
        try:
            # Every stalled stream takes its share (INBOX_LIMIT: what it holds plus its open window),
            # and no more: wait for that, then for a stop.
            await until(lambda: received() >= streams * 3 * MB // 4, "the stalled streams to fill", 60)
            await stable(lambda: sent + received(), quiet=1.5, timeout=60)
            for conn in running.server.connections:
                for c in conn.calls.values():  # (and each message's overhead: the window saw 5 bytes of it)
                    assert c.held <= transport_call.INBOX_LIMIT + 8 * transport_call.MESSAGE_OVERHEAD
            request = random.Random(5).randbytes(100_000)
            assert await bounded(ch.unary_unary(path("Digest"))(request)) == \
                b"%d:" % len(request) + hashlib.sha256(request).digest()
        finally:
            release.set()
            for task in fillers:
                task.cancel()
            for call in calls:
                call.cancel()


# -- stop -------------------------------------------------------------------------------------


async def test_stop_with_grace_ends_open_streams_and_refuses_new_connections() -> None:
    state = State()

    async def forever(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                yield request
        finally:
            state.ended.set()

    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Forever": _stream(forever), **ECHO}),))
    port = await server.listen("127.0.0.1", 0)
    await server.start()
    running = Running(server, port)
    stopper: asyncio.Task[None] | None = None
    try:
        async with channel(running) as ch:
            call = ch.stream_stream(path("Forever"))()
            await bounded(call.write(b"hi"))
            assert await bounded(call.read()) == b"hi"
            grace = 1.0
            stopper = asyncio.create_task(server.stop(grace))
            # The client sees its stream end (an error status); the stream would go on forever
            # otherwise, so the bounded read is the check.
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await bounded(call.read(), grace + 5) is not grpc.aio.EOF:
                    pass
            assert await bounded(call.code(), 5) != grpc.StatusCode.OK
            await bounded(stopper, grace + 5)
            await bounded(state.ended.wait())
            assert not server.connections
        # New connections are refused.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        async with channel(running) as ch2:
            err = await rpc_error(ch2.unary_unary(path("Echo"))(b"x", timeout=5))
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        if stopper is None:
            await server.stop(0)


async def test_stop_with_grace_lets_a_call_finish() -> None:
    state = State()

    async def finishing(request: bytes, context: Any) -> bytes:
        state.started.set()
        await asyncio.sleep(0.5)
        return b"finished"

    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Finishing": _unary(finishing)}),))
    port = await server.listen("127.0.0.1", 0)
    await server.start()
    try:
        async with channel(Running(server, port)) as ch:
            call = ch.unary_unary(path("Finishing"))(b"")
            await bounded(state.started.wait())
            # Returned when the call ended: waiting out the 60 s grace would exceed the bound.
            await bounded(server.stop(60.0), 30)
            assert await bounded(call) == b"finished"
    finally:
        await server.stop(0)


async def test_stop_with_grace_lets_a_stream_carry_on_until_it_ends() -> None:
    """During the grace period an open stream still exchanges messages both ways and ends with
    its own status; new calls on the connection are refused."""
    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"re:" + request

    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Chat": _stream(chat), **ECHO}),))
    port = await server.listen("127.0.0.1", 0)
    await server.start()
    stopper: asyncio.Task[None] | None = None
    try:
        async with channel(Running(server, port)) as ch:
            call = ch.stream_stream(path("Chat"))()
            await bounded(call.write(b"before"))
            assert await bounded(call.read()) == b"re:before"
            stopper = asyncio.create_task(server.stop(10.0))
            await asyncio.sleep(0.2)
            assert not stopper.done()
            await bounded(call.write(b"during"))
            assert await bounded(call.read()) == b"re:during"
            # A new call: not on this connection (GOAWAY), and no new connection (not listening).
            err = await rpc_error(ch.unary_unary(path("Echo"))(b"x", timeout=5))
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            await bounded(call.done_writing())
            assert await bounded(call.read()) is grpc.aio.EOF
            assert await bounded(call.code()) == grpc.StatusCode.OK
            await bounded(stopper, 5)  # the last call ended: stop returns before its grace is up
    finally:
        if stopper is None or not stopper.done():
            await server.stop(0)


async def test_stop_zero_cuts_calls_at_once() -> None:
    state = State()

    async def forever(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                yield request
        finally:
            state.ended.set()

    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"F": _stream(forever)}),))
    port = await server.listen("127.0.0.1", 0)
    await server.start()
    try:
        async with channel(Running(server, port)) as ch:
            call = ch.stream_stream(path("F"))()
            await bounded(call.write(b"a"))
            assert await bounded(call.read()) == b"a"
            await bounded(server.stop(0))  # the stream would never end by itself
            await bounded(state.ended.wait())
            err = await rpc_error(call.read())
            assert err.code() != grpc.StatusCode.OK
    finally:
        await server.stop(0)


async def test_stop_closes_idle_connections_at_once() -> None:
    """Connections with no call open (one that never sent a byte, one after its call) do not hold
    stop for its grace period."""
    server = GrpcServer()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, ECHO),))
    port = await server.listen("127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await bounded(asyncio.open_connection("127.0.0.1", port))
        async with channel(Running(server, port)) as ch:
            assert await bounded(ch.unary_unary(path("Echo"))(b"x")) == b"x"
            await until(lambda: len(server.connections) == 2, "both connections")
            await bounded(server.stop(60.0))  # at most T: the idle connections did not hold it for 60 s
            await bounded(_read_until_eof(reader))
            writer.close()
            assert not server.connections
    finally:
        await server.stop(0)


async def test_stop_before_any_connection_and_twice() -> None:
    server = GrpcServer()
    await server.listen("127.0.0.1", 0)
    await server.start()
    await bounded(server.stop(1.0))
    await bounded(server.stop(0))


# -- TLS --------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file, pem


async def test_tls_with_a_grpc_secure_channel(tmp_path: Path) -> None:
    cert_file, key_file, pem = _self_signed(tmp_path)
    tls = server_tls(str(cert_file), str(key_file))
    async with serving(ECHO, tls=tls) as running:
        creds = grpc.ssl_channel_credentials(root_certificates=pem)
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(running.target, creds, options=options) as ch:
            assert await bounded(ch.unary_unary(path("Echo"))(b"secret")) == b"secret"
            call = ch.stream_stream(path("EchoStream"))()
            for i in range(50):
                await bounded(call.write(b"%d" % i))
                assert await bounded(call.read()) == b"%d" % i
            await bounded(call.done_writing())
            assert await bounded(call.code()) == grpc.StatusCode.OK
            size = 3 * MB
            assert await bounded(ch.unary_unary(path("Sized"))(b"%d" % size), 30) == \
                random.Random(size).randbytes(size)
        # A plaintext client on the TLS port fails cleanly.
        async with channel(running) as plain:
            err = await rpc_error(plain.unary_unary(path("Echo"))(b"x", timeout=5))
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- non-gRPC peers (h2 client) ---------------------------------------------------------------


@dataclass
class RawResponse:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers or from a trailers-only response's headers."""
        value = (self.trailers or self.headers).get(b"grpc-status")
        return None if value is None else int(value)


class RawH2:
    """A minimal HTTP/2 client over a plain socket, to send what grpcio's client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.h2.increment_flow_control_window(window - 65_535)
        self.responses: dict[int, RawResponse] = {}
        self.ended: set[int] = set()
        self.flush()

    @classmethod
    async def open(cls, port: int, window: int | None = None) -> RawH2:
        reader, writer = await bounded(asyncio.open_connection("127.0.0.1", port))
        return cls(reader, writer, window)

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.writer.write(out)

    def request(self, p: str, *, method: bytes = b"POST", content_type: bytes | None = b"application/grpc",
                extra: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
                end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", p.encode()),
                   (b":authority", b"localhost")]
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if method == b"POST":
            headers.append((b"te", b"trailers"))
        headers.extend(extra or [])
        self.h2.send_headers(sid, headers, end_stream=body is None and end)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.responses[sid] = RawResponse()
        self.flush()
        return sid

    async def pump(self) -> None:
        data = await bounded(self.reader.read(1 << 16))
        if not data:
            raise EOFError("the server closed the connection")
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            response = self.responses.get(sid) if sid is not None else None
            if isinstance(event, h2.events.ResponseReceived) and response is not None:
                response.headers = dict(event.headers)
            elif isinstance(event, h2.events.TrailersReceived) and response is not None:
                response.trailers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                if response is not None:
                    response.data += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                if response is not None:
                    response.reset = event.error_code
                self.ended.add(event.stream_id)
        self.flush()

    async def response(self, sid: int) -> RawResponse:
        async def wait() -> RawResponse:
            while sid not in self.ended:
                await self.pump()
            return self.responses[sid]
        return await bounded(wait())

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize(("method", "content_type", "status"), [
    (b"GET", None, b"405"),
    (b"PUT", b"application/grpc", b"405"),
    (b"POST", b"text/plain", b"415"),
    (b"POST", None, b"415"),
])
async def test_non_grpc_requests_get_http_errors(method: bytes, content_type: bytes | None, status: bytes) -> None:
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Echo"), method=method, content_type=content_type,
                                 body=b"hello" if method != b"GET" else None)
            response = await client.response(sid)
            assert response.headers.get(b":status") == status
            # The connection still serves gRPC.
            sid = client.request(path("Echo"), body=frame(b"ping"))
            response = await client.response(sid)
            assert response.headers.get(b":status") == b"200"
            assert response.data == frame(b"ping")
            assert response.status == 0
        finally:
            client.close()


async def test_raw_h2_grpc_variants() -> None:
    """Framing a grpcio client does not produce: a message split across frames, two in one frame,
    a grpc-content-type suffix, a request with no message, a compressed flag without grpc-encoding."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("EchoStream"), content_type=b"application/grpc+proto", end=False)
            framed = frame(b"split message") + frame(b"second")
            for i in range(len(framed)):
                client.h2.send_data(sid, framed[i:i + 1])
            client.h2.end_stream(sid)
            client.flush()
            response = await client.response(sid)
            assert response.data == frame(b"split message") + frame(b"second")
            assert response.status == 0

            sid = client.request(path("Echo"))  # headers with END_STREAM: no request message
            response = await client.response(sid)
            assert response.status not in (None, 0)

            sid = client.request(path("Echo"), body=b"\x01" + frame(b"zipped")[1:])
            response = await client.response(sid)
            assert response.status not in (None, 0)

            sid = client.request(path("Echo"), body=b"\0\0\0")  # ends inside a message prefix
            response = await client.response(sid)
            assert response.status not in (None, 0)
        finally:
            client.close()


async def test_a_storm_of_connections_all_get_answers() -> None:
    """Hundreds of connections readable at once (a reconnect storm): the server spreads their
    handling over loop iterations (its read budget) and answers every one."""
    async with serving(ECHO) as running:
        clients = await bounded(asyncio.gather(*(RawH2.open(running.port) for _ in range(200))), 30)
        try:
            sids = [c.request(path("Echo"), body=frame(b"storm %d" % i)) for i, c in enumerate(clients)]
            responses = await bounded(asyncio.gather(*(c.response(sid) for c, sid in zip(clients, sids, strict=True))), 60)
            for i, response in enumerate(responses):
                assert response.data == frame(b"storm %d" % i)
                assert response.status == 0
            assert len(running.server.connections) == 200
        finally:
            for client in clients:
                client.close()
        await until(lambda: not running.server.connections, "the connections to be dropped")


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    received = b""
    while chunk := await reader.read(65536):
        received += chunk
    return received


async def test_garbage_instead_of_the_preface_closes_the_connection() -> None:
    async with serving(ECHO) as running:
        reader, writer = await bounded(asyncio.open_connection("127.0.0.1", running.port))
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await bounded(_read_until_eof(reader))  # EOF (not a hang) ends the read
        finally:
            writer.close()
        await until(lambda: not running.server.connections, "the connection to be dropped")


async def test_a_connection_that_never_sends_a_request_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_connection, "HANDSHAKE_TIMEOUT", 0.3)
    async with serving(ECHO) as running:
        reader, writer = await bounded(asyncio.open_connection("127.0.0.1", running.port))
        try:
            await bounded(_read_until_eof(reader))  # the server's SETTINGS, then EOF
        finally:
            writer.close()
        # A connection with a call open is not closed by that timer.
        async with channel(running) as ch:
            call = ch.stream_stream(path("EchoStream"))()
            await bounded(call.write(b"a"))
            assert await bounded(call.read()) == b"a"
            await asyncio.sleep(0.6)
            await bounded(call.write(b"b"))
            assert await bounded(call.read()) == b"b"


async def test_one_call_ending_while_the_socket_is_full_leaves_the_others_alone() -> None:
    """Two streams flood a client that stops reading its socket: the server's transport pauses and
    both handlers wait to write. One call's deadline (grpc-timeout) passes and it ends; the other
    call must carry on, and flows again once the client reads."""
    states: list[State] = []

    async def flood(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        state = State()
        states.append(state)
        chunk = b"f" * 65536
        try:
            while True:
                yield chunk
                state.written += 1
        finally:
            state.ended.set()  # GeneratorExit when its call is dropped (the generator is closed)

    async with serving({"Flood": _stream(flood)}) as running:
        client = await RawH2.open(running.port, window=2**31 - 1)  # windows never stop the server
        try:
            # Both requests at once: once its transport pauses, the server stops reading the client.
            timed = client.request(path("Flood"), end=False, extra=[(b"grpc-timeout", b"1500m")])
            other = client.request(path("Flood"), end=False)
            await until(lambda: len(states) == 2, "both handlers")
            # Read nothing: the socket buffers fill and the server's transport pauses.
            await stable(lambda: states[0].written + states[1].written, quiet=0.3, timeout=30)
            (conn,) = running.server.connections
            assert conn.paused
            assert set(conn.calls) == {timed, other}
            await bounded(states[0].ended.wait())  # the deadline passed
            await asyncio.sleep(0.3)
            assert not states[1].ended.is_set(), "one call's deadline ended the other call too"
            assert set(conn.calls) == {other}
            before = states[1].written
            for _ in range(1000):  # read again: the other stream flows, the timed one has its status
                await client.pump()
                if states[1].written > before + 5 and timed in client.ended:
                    break
            assert states[1].written > before + 5
            assert client.responses[timed].status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert other not in client.ended
        finally:
            client.close()


# -- a hostile peer: limits on what one connection can make the server hold or spend -------------


async def _until_closed(client: RawH2) -> list[Any]:
    """What the server sends until it closes the connection (as h2 events). A close with bytes of
    ours still unread reaches us as a reset: that ends the read too."""
    events: list[Any] = []
    try:
        while data := await client.reader.read(65536):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                events.extend(client.h2.receive_data(data))
    except ConnectionResetError:
        pass
    return events


def _goaway_code(events: list[Any]) -> int | None:
    codes = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    return codes[0] if codes else None


def _hold(state: State) -> grpc.RpcMethodHandler:
    """A stream handler that reads nothing until ``state.release``, then counts every request."""
    async def hold(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        state.started.set()
        try:
            await state.release.wait()
            async for request in requests:
                state.received.append(request)
            yield b"%d" % len(state.received)
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        finally:
            state.ended.set()
    return _stream(hold)


async def test_a_frame_longer_than_max_frame_size_ends_the_connection_at_its_header() -> None:
    """h2 checks a frame's length once the whole frame is buffered: a frame header claiming 16 MiB
    had the server buffer up to 16 MiB per connection. Now the connection ends at the header."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            client.writer.write((0xFFFFFF).to_bytes(3, "big") + b"\0\0" + (1).to_bytes(4, "big") + b"x" * 100)
            events = await bounded(_until_closed(client))
            assert _goaway_code(events) == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
        finally:
            client.close()
        await until(lambda: not running.server.connections, "the connection to be dropped")


async def test_a_header_block_past_its_limit_ends_the_connection_before_it_is_all_sent() -> None:
    """h2 buffers up to 64 CONTINUATION frames (1 MiB) of one header block and decodes it in one go.
    A block longer than 4 x SETTINGS_MAX_HEADER_LIST_SIZE (what Huffman coding can make of a list
    within it) ends the connection as soon as its frames say so."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            junk = b"\x20" * 16384  # 16 KiB of HPACK table size updates
            client.writer.write(HeadersFrame(1, junk).serialize()
                                + b"".join(ContinuationFrame(1, junk).serialize() for _ in range(16)))
            events = await bounded(_until_closed(client))
            assert _goaway_code(events) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        finally:
            client.close()


async def test_a_header_list_near_its_limit_in_continuation_frames_is_served() -> None:
    seen: list[Any] = []

    async def metadata_size(request: bytes, context: Any) -> bytes:
        seen.extend(context.invocation_metadata())
        return request

    async with serving({"M": _unary(metadata_size)}) as running:
        client = await RawH2.open(running.port)
        try:
            value = bytes(random.Random(1).choice(b"\\^`{}<>|~") for _ in range(60_000))  # Huffman: 10-19 bits each
            sid = client.request(path("M"), body=frame(b"big"), extra=[(b"x-big", value)])
            response = await client.response(sid)
            assert response.status == 0
            assert ("x-big", value.decode()) in seen
        finally:
            client.close()


def _with_table_size_updates(headers_frame: bytes, updates: bytes) -> bytes:
    """A HEADERS frame (END_HEADERS, no padding or priority) with HPACK table size updates put first."""
    length = int.from_bytes(headers_frame[:3], "big") + len(updates)
    return length.to_bytes(3, "big") + headers_frame[3:9] + updates + headers_frame[9:]


@pytest.mark.parametrize("updates", [2, 3])
async def test_at_most_two_table_size_updates_start_a_header_block(updates: int) -> None:
    """RFC 7541 §4.2: at most two. hpack decoded any number (~0.7 us of loop per byte of them)."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            await client.pump()  # the server's SETTINGS: the request goes out in its own write
            client.h2.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path("Echo").encode()),
                                       (b":authority", b"localhost"), (b"content-type", b"application/grpc")])
            headers = client.h2.data_to_send()
            # Size 0 (the table emptied: the client's encoder table is empty too), then 4096.
            client.writer.write(_with_table_size_updates(headers, b"\x20" * (updates - 1) + b"\x3f\xe1\x1f"))
            client.h2.send_data(1, frame(b"sized"), end_stream=True)
            client.responses[1] = RawResponse()
            client.flush()
            if updates <= 2:
                response = await client.response(1)
                assert response.status == 0 and response.data == frame(b"sized")
            else:
                events = await bounded(_until_closed(client))
                assert _goaway_code(events) not in (None, h2.errors.ErrorCodes.NO_ERROR)
        finally:
            client.close()


async def test_rapid_reset_ends_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once cost ~80 us each (a call
    started and cancelled) and the connection took any number. A client resetting now and then
    keeps its connection; one past CHURN_BURST resets at once is sent GOAWAY and dropped."""
    caplog.set_level("DEBUG", logger="xdsd.transport.connection")
    state = State()
    async with serving({"Hold": _hold(state), **ECHO}) as running:
        client = await RawH2.open(running.port)
        try:
            for _ in range(100):
                sid = client.request(path("Hold"), end=False)
                client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                client.flush()
            sid = client.request(path("Echo"), body=frame(b"still here"))
            assert (await client.response(sid)).status == 0
            (conn,) = running.server.connections
            await until(lambda: not conn.calls, "the reset calls to be dropped")

            for _ in range(transport_connection.CHURN_BURST):
                sid = client.request(path("Hold"), end=False)
                client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            await bounded(_until_closed(client))
        finally:
            client.close()
        await until(lambda: not running.server.connections, "the connection to be dropped")
        assert "too many stream resets" in caplog.text
        assert not conn.calls


async def test_a_settings_flood_ends_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """h2 visits every stream for each SETTINGS frame that carries INITIAL_WINDOW_SIZE: with 1,000
    calls open, ~65 us for a 15-byte frame."""
    caplog.set_level("DEBUG", logger="xdsd.transport.connection")
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Echo"), body=frame(b"x"))
            assert (await client.response(sid)).status == 0
            settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65_535}).serialize()
            client.writer.write(settings * (transport_connection.CHURN_BURST + 100))
            await bounded(_until_closed(client))
        finally:
            client.close()
        await until(lambda: not running.server.connections, "the connection to be dropped")
        assert "too many SETTINGS frames" in caplog.text


async def test_a_large_client_header_table_does_not_grow_the_servers_encoder_table() -> None:
    """Our HPACK encoder kept every distinct header value it sent (grpc-message echoes the request's
    grpc-encoding) in a table as large as the client's SETTINGS_HEADER_TABLE_SIZE allowed, and
    searched it linearly for every header."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            client.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 24})
            client.flush()
            for i in range(50):
                encoding = b"zip-%d-" % i + b"x" * 500
                sid = client.request(path("Echo"), body=frame(b"a"), extra=[(b"grpc-encoding", encoding)])
                response = await client.response(sid)
                assert response.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
                assert encoding in (response.trailers or response.headers)[b"grpc-message"]
            (conn,) = running.server.connections
            table = conn.h2.encoder.header_table
            assert conn.h2.encoder.header_table_size == transport_connection.ENCODER_TABLE_SIZE
            assert sum(32 + len(n) + len(v) for n, v in table.dynamic_entries) <= transport_connection.ENCODER_TABLE_SIZE
        finally:
            client.close()


async def test_empty_messages_count_against_the_inbox_limit() -> None:
    """The inbox counted message bytes only: 0-byte messages (5 bytes on the wire) were queued
    without bound while the window stayed open. Each counts MESSAGE_OVERHEAD now: a handler that
    does not read holds the client by flow control, and then reads every message."""
    state = State()
    async with serving({"Hold": _hold(state)}, stream_window=65_535) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Hold"), end=False)
            await bounded(state.started.wait())
            sent = 0
            while sent < 20 * MB:
                window = min(client.h2.local_flow_control_window(sid), 16_380) // 5 * 5
                if window == 0:
                    try:
                        await asyncio.wait_for(client.pump(), 1.0)  # a WINDOW_UPDATE, or held
                    except TimeoutError:
                        break
                    continue
                client.h2.send_data(sid, b"\0\0\0\0\0" * (window // 5))
                client.flush()
                sent += window
            assert sent < 20 * MB, "the window kept opening"
            (conn,) = running.server.connections
            call = conn.calls[sid]
            limit = transport_call.INBOX_LIMIT // transport_call.MESSAGE_OVERHEAD + 65_535 // 5 + 1
            assert len(call._inbox) <= limit
            state.release.set()
            client.h2.end_stream(sid)
            client.flush()
            response = await client.response(sid)
            assert response.data == frame(b"%d" % (sent // 5))
            assert len(state.received) == sent // 5 and not any(state.received)
        finally:
            client.close()


async def test_one_read_of_many_small_frames_is_handled_in_slices_across_loop_iterations() -> None:
    """A read is up to 256 KiB: ~15,000 PINGs, resets or SETTINGS took up to ~1 s of the loop in one
    piece. They go to h2 FRAMES_PER_SLICE frames at a time, under the read budget."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        try:
            sid = client.request(path("Echo"), body=frame(b"x"))
            assert (await client.response(sid)).status == 0
            (conn,) = running.server.connections
            slices: list[tuple[int, int]] = []
            process = conn._process

            def recording(data: bytes, control: list[int] | None = None) -> None:
                slices.append((len(data), ticks))
                process(data, control)

            conn._process = recording  # type: ignore[method-assign]
            pings = 20_000
            client.writer.write(PingFrame(0, opaque_data=b"12345678").serialize() * pings)
            acks = 0
            while acks < pings:
                data = await bounded(client.reader.read(1 << 16))
                assert data, "the server closed the connection"
                acks += sum(isinstance(e, h2.events.PingAckReceived) for e in client.h2.receive_data(data))
            assert max(size for size, _ in slices) <= transport_connection.FRAMES_PER_SLICE * 17
            assert len({tick for _, tick in slices}) > 1, "every slice in one loop iteration"
        finally:
            ticking.cancel()
            client.close()


async def test_pings_and_window_updates_are_handled_by_the_connection_itself() -> None:
    """PING and WINDOW_UPDATE frames (grpc-core sends three to four per response it receives) skip
    h2's frame machinery: each PING is answered with its own data, and a response held by flow
    control goes out once the client's WINDOW_UPDATEs open the windows."""
    big = b"y" * 200_000
    async with serving({**ECHO, "Big": _unary(lambda request, context: big)}) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Echo"), body=frame(b"x"))
            assert (await client.response(sid)).status == 0
            (conn,) = running.server.connections
            applied: list[int] = []
            control = conn._control

            def counting(data: bytes, at: list[int], fed: dict[Any, None]) -> tuple[bytes, bool, int]:
                rest, windows, held = control(data, at, fed)
                applied.append(len(data) - len(rest))
                return rest, windows, held

            conn._control = counting  # type: ignore[method-assign]
            for payload in (b"abcdefgh", b"12345678"):
                client.h2.ping(payload)
            client.flush()
            acks: list[bytes] = []
            while len(acks) < 2:
                data = await bounded(client.reader.read(1 << 16))
                assert data, "the server closed the connection"
                acks += [e.ping_data for e in client.h2.receive_data(data) if isinstance(e, h2.events.PingAckReceived)]
            assert acks == [b"abcdefgh", b"12345678"]
            sid = client.request(path("Big"), body=frame(b"x"))  # 200 KB through a 65,535-byte window
            response = await client.response(sid)
            assert response.status == 0 and response.data == frame(big)
            assert sum(applied) >= 2 * 17 + 13, "the PINGs and WINDOW_UPDATEs went through h2"
        finally:
            client.close()


async def test_closed_streams_are_remembered_up_to_a_bound() -> None:
    """h2 remembers 65,536 closed streams per connection by default (~8 MB)."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            for _ in range(13):
                sids = [client.request(path("Echo"), body=frame(b"x")) for _ in range(100)]
                for sid in sids:
                    assert (await client.response(sid)).status == 0
            (conn,) = running.server.connections
            assert conn.h2.highest_inbound_stream_id > 2 * 1300 - 2
            assert len(conn.h2._closed_streams) <= transport_connection.CLOSED_STREAMS
        finally:
            client.close()


async def test_a_connection_closed_while_waiting_for_its_read_turn_is_not_processed() -> None:
    """Past the read budget a connection keeps its bytes for a later turn; closed meanwhile, it is
    dropped then, its bytes unread (no call started)."""
    state = State()
    async with serving({"Hold": _hold(state), **ECHO}) as running:
        client = await RawH2.open(running.port)
        budget = running.server.read_budget
        try:
            sid = client.request(path("Echo"), body=frame(b"x"))
            assert (await client.response(sid)).status == 0
            (conn,) = running.server.connections
            budget.exhausted = lambda: True  # type: ignore[method-assign]
            client.request(path("Hold"), end=False)
            await until(lambda: conn._backlog is not None, "the bytes to wait for their turn")
            conn.abort()
            await until(lambda: not running.server.connections, "the connection to be dropped")
            del budget.exhausted
            await until(lambda: not budget._waiting, "its turn")
            await asyncio.sleep(0.1)
            assert not state.started.is_set() and not conn.calls
        finally:
            vars(budget).pop("exhausted", None)
            client.close()


@pytest.mark.parametrize(("method", "name"), [(b"GET", "Echo"), (b"POST", "Missing")])
async def test_a_request_reset_in_the_read_that_brought_it_leaves_the_connection_serving(method: bytes, name: str) -> None:
    """A request the server answers at once (405, UNIMPLEMENTED) and its RST_STREAM in one read: h2
    has closed the stream when the answer is sent, and that error ended the whole connection."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            await client.pump()
            keep = client.request(path("EchoStream"), end=False)
            sid = client.h2.get_next_available_stream_id()
            client.h2.send_headers(sid, [(b":method", method), (b":scheme", b"http"), (b":path", path(name).encode()),
                                         (b":authority", b"localhost"), (b"content-type", b"application/grpc")])
            client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            client.flush()  # one write
            client.h2.send_data(keep, frame(b"after"), end_stream=True)
            client.flush()
            response = await client.response(keep)
            assert response.status == 0 and response.data == frame(b"after")
        finally:
            client.close()


async def test_a_connection_failing_in_its_read_turn_does_not_hold_up_the_others() -> None:
    async with serving(ECHO) as running:
        budget = running.server.read_budget
        first, second = await RawH2.open(running.port), await RawH2.open(running.port)
        try:
            for client in (first, second):
                sid = client.request(path("Echo"), body=frame(b"x"))
                assert (await client.response(sid)).status == 0
            await until(lambda: len(running.server.connections) == 2, "both connections")
            budget.exhausted = lambda: True  # type: ignore[method-assign]
            first.request(path("Echo"), body=frame(b"first"))
            await until(lambda: any(c._backlog is not None for c in running.server.connections), "the first to wait")
            (failing,) = [c for c in running.server.connections if c._backlog is not None]

            def broken(data: bytes) -> None:
                raise RuntimeError("a bug")

            failing._process = broken  # type: ignore[method-assign]
            sid = second.request(path("Echo"), body=frame(b"second"))
            await until(lambda: all(c._backlog is not None for c in running.server.connections), "both to wait")
            del budget.exhausted
            response = await second.response(sid)
            assert response.data == frame(b"second")
            await until(lambda: failing not in running.server.connections, "the failing connection to be dropped")
        finally:
            vars(budget).pop("exhausted", None)
            first.close()
            second.close()


async def test_stop_ends_even_with_handlers_that_ignore_cancellation_or_fail_when_cancelled() -> None:
    done = asyncio.Event()
    ended: list[str] = []

    async def stubborn(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        while not done.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        ended.append("stubborn")
        yield b""

    async def failing(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:
            await asyncio.sleep(3600)
            yield b""
        finally:
            ended.append("failing")
            raise RuntimeError("cleanup failed")  # noqa: B012

    for grace in (0.0, 1.0):
        server = GrpcServer()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"S": _stream(stubborn), "F": _stream(failing)}),))
        port = await server.listen("127.0.0.1", 0)
        await server.start()
        client = await RawH2.open(port)
        try:
            client.request(path("S"), end=False)
            client.request(path("F"), end=False)
            await until(lambda s=server: sum(len(c.calls) for c in s.connections) == 2, "both calls")
            await bounded(server.stop(grace))  # the stubborn handler alone would hold it forever
            assert not server.connections
            await until(lambda: "failing" in ended, "the failing handler to end")
        finally:
            done.set()
            await until(lambda: "stubborn" in ended, "the stubborn handler to end")
            done.clear()
            ended.clear()
            client.close()
            await server.stop(0)


# -- the same under uvloop (what ``xdsd serve`` runs) ------------------------------------------


UVLOOP_SCENARIOS = [
    test_unary_echo_bytes, test_stream_echo_many_messages_both_directions_interleaved,
    test_protobuf_serializers_unary_and_stream, test_concurrent_calls_share_one_connection,
    test_response_larger_than_every_window_arrives_whole,
    test_request_larger_than_the_window_but_under_the_limit_arrives_whole,
    test_request_above_max_receive_message_length_is_resource_exhausted,
    test_set_code_and_details_then_return, test_trailing_and_initial_metadata_reach_the_client,
    test_invocation_metadata_and_peer, test_deadline_exceeded_cancels_the_handler,
    test_client_cancel_cancels_the_handler_and_the_connection_keeps_serving,
    test_cancel_while_the_handler_waits_on_flow_control, test_gzip_request_gets_a_clean_error_status,
    test_half_close_ends_the_request_iterator_and_the_handler_still_writes,
    test_server_writes_wait_for_a_client_that_does_not_read,
    test_client_streaming_faster_than_the_handler_reads_is_held_by_flow_control,
    test_stop_with_grace_ends_open_streams_and_refuses_new_connections, test_stop_with_grace_lets_a_call_finish,
    test_tls_with_a_grpc_secure_channel, test_garbage_instead_of_the_preface_closes_the_connection,
    test_one_call_ending_while_the_socket_is_full_leaves_the_others_alone,
    test_a_frame_longer_than_max_frame_size_ends_the_connection_at_its_header,
    test_a_header_block_past_its_limit_ends_the_connection_before_it_is_all_sent,
    test_empty_messages_count_against_the_inbox_limit,
    test_one_read_of_many_small_frames_is_handled_in_slices_across_loop_iterations,
]


@pytest.mark.parametrize("scenario", [pytest.param(fn, id=fn.__name__.removeprefix("test_"))
                                      for fn in UVLOOP_SCENARIOS])
def test_under_uvloop(scenario: Callable[..., Awaitable[None]], tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(scenario).parameters else {}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(**kwargs), 120))


async def test_connections_have_tcp_keepalive() -> None:
    """A proxy whose machine died sends no FIN: keepalive probes end its connection."""
    async with serving(ECHO) as running, channel(running) as ch:
        assert await bounded(ch.unary_unary(path("Echo"))(b"x")) == b"x"
        (conn,) = running.server.connections
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60


def _counting_control(conn: Any) -> list[int]:
    """Bytes of each slice the connection handled without h2 (see Connection._control)."""
    applied: list[int] = []
    control = conn._control

    def counting(data: bytes, at: list[int], fed: dict[Any, None]) -> tuple[bytes, bool, int]:
        rest, windows, held = control(data, at, fed)
        applied.append(len(data) - len(rest))
        return rest, windows, held

    conn._control = counting
    return applied


async def _echoes(client: RawH2, sid: int, count: int) -> bytes:
    async def wait() -> bytes:
        while len(client.responses[sid].data) < count:
            await client.pump()
        return client.responses[sid].data
    return await bounded(wait())


async def test_request_data_of_open_streams_skips_h2_and_keeps_its_order() -> None:
    """DATA frames of an open stream are fed to the call by the connection itself (an xDS ACK is
    one such frame): messages split over frames, padded frames (left to h2) and plain ones in one
    read arrive whole and in order; after a RST_STREAM in the same read nothing reaches the call."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("EchoStream"), body=frame(b"first"), end=False)
            assert await _echoes(client, sid, len(frame(b"first"))) == frame(b"first")
            (conn,) = running.server.connections
            applied = _counting_control(conn)
            expected = frame(b"first")
            for i in range(5):  # one message per read, as ACKs come
                message = frame(b"ack-%d" % i)
                client.h2.send_data(sid, message)
                client.flush()
                expected += message
                assert await _echoes(client, sid, len(expected)) == expected
            assert sum(applied) == sum(9 + len(frame(b"ack-%d" % i)) for i in range(5))
            # One message over three frames in one read: padded (h2's), plain, plain. The plain ones
            # may not overtake the padded one.
            message = frame(b"abcdefghijklmnopqrstuvwxyz" * 10)
            client.h2.send_data(sid, message[:7], pad_length=3)
            client.h2.send_data(sid, message[7:100])
            client.h2.send_data(sid, message[100:])
            client.flush()
            expected += message
            assert await _echoes(client, sid, len(expected)) == expected
            # A message across two reads, the second also holding the next message whole.
            split = frame(b"x" * 300)
            following = frame(b"y" * 10)
            client.h2.send_data(sid, split)
            client.h2.send_data(sid, following)
            wire = client.h2.data_to_send()
            client.writer.write(wire[:150])
            await bounded(client.writer.drain())
            await asyncio.sleep(0.05)
            client.writer.write(wire[150:])
            expected += split + following
            assert await _echoes(client, sid, len(expected)) == expected
            # The request ends (END_STREAM, left to h2) and the call ends as usual.
            client.h2.send_data(sid, frame(b"last"), end_stream=True)
            client.flush()
            response = await client.response(sid)
            assert response.status == 0 and response.data == expected + frame(b"last")
        finally:
            client.close()


def _recorder() -> tuple[list[bytes], grpc.RpcMethodHandler]:
    """A bidi method that echoes each request and records what reached it."""
    seen: list[bytes] = []

    async def record(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            seen.append(request)
            yield request

    return seen, _stream(record)


def _data_frame(sid: int, payload: bytes) -> bytes:
    """A DATA frame (no flags) written by hand: h2 would refuse to build some we need."""
    return len(payload).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + payload


async def test_data_after_a_reset_in_the_same_read_never_reaches_the_call() -> None:
    seen, record = _recorder()
    async with serving({"Record": record, **ECHO}) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Record"), body=frame(b"one"), end=False)
            assert await _echoes(client, sid, len(frame(b"one"))) == frame(b"one")
            client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            wire = client.h2.data_to_send()
            # DATA on the reset stream, as a client's stale buffer might hold (h2 would refuse to build it).
            wire += _data_frame(sid, frame(b"two"))
            client.writer.write(wire)
            other = client.request(path("Echo"), body=frame(b"ping"))
            assert (await client.response(other)).data == frame(b"ping")  # the connection lives on
            assert seen == [b"one"]
        finally:
            client.close()


async def test_data_past_the_window_is_a_flow_control_error() -> None:
    """A DATA frame larger than the stream's window is h2's to judge (RFC 9113 §6.9.1)."""
    async with serving(ECHO) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("EchoStream"), body=frame(b"first"), end=False)
            assert await _echoes(client, sid, len(frame(b"first"))) == frame(b"first")
            (conn,) = running.server.connections
            window = conn.h2._get_stream_by_id(sid).inbound_flow_control_window
            size = min(window + 1, 16_384)
            chunks = []
            while window >= 0:  # past the window, in frames of at most the default 16 KiB
                chunks.append(size)
                window -= size
            wire = b"".join(_data_frame(sid, b"z" * n) for n in chunks)
            client.writer.write(wire)
            events: list[Any] = []
            with contextlib.suppress(EOFError, ConnectionError):
                while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    data = await bounded(client.reader.read(1 << 16))
                    if not data:
                        break
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        events += client.h2.receive_data(data)
            ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
            assert (ended and ended[0].error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR) or \
                (resets and resets[0].error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR), events
        finally:
            client.close()


@pytest.mark.parametrize("bad", [
    b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + b"1234567",  # PING of 7 bytes: FRAME_SIZE_ERROR
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + (2**31 - 1).to_bytes(4, "big"),  # connection window past 2^31-1
    b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x04" + (2**31).to_bytes(4, "big"),  # SETTINGS window 2^31
], ids=["short-ping", "window-overflow", "bad-settings"])
async def test_data_after_a_frame_that_ends_the_connection_never_reaches_the_call(bad: bytes) -> None:
    """h2 stops at a connection error (RFC 9113 §5.4.1): a DATA frame behind it in the same read
    must not be handed to its call first."""
    seen, record = _recorder()
    async with serving({"Record": record, **ECHO}) as running:
        client = await RawH2.open(running.port)
        try:
            sid = client.request(path("Record"), body=frame(b"one"), end=False)
            assert await _echoes(client, sid, len(frame(b"one"))) == frame(b"one")
            client.writer.write(bad + _data_frame(sid, frame(b"two")))
            closed = False
            with contextlib.suppress(EOFError, ConnectionError):
                while True:
                    chunk = await bounded(client.reader.read(1 << 16))
                    if not chunk:
                        closed = True
                        break
            assert closed, "the connection stayed open"
            await asyncio.sleep(0.05)
            assert seen == [b"one"]
        finally:
            client.close()
