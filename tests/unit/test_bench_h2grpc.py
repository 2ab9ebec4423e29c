"""bench.h2grpc, the load generator's h2 gRPC client: framing, reassembly, flow control and status,
against a real grpc.aio server in the same process."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from bench.h2grpc import CANCELLED, UNAVAILABLE, H2GrpcError, H2Stream, open_stream


def _identity(b: bytes) -> bytes:
    return b


async def _echo(requests: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    assert ("x-test-token", "t0k") in tuple(ctx.invocation_metadata() or ())
    async for req in requests:
        if req == b"abort":
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "nö way: 100%")
        if req == b"end":
            return
        if req.startswith(b"burst"):
            for i in range(int(req[5:])):
                yield b"m%d" % i
            continue
        yield req


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                   ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    handler = grpc.method_handlers_generic_handler("t.Echo", {
        "Run": grpc.stream_stream_rpc_method_handler(_echo, request_deserializer=_identity,
                                                     response_serializer=_identity)})
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield port
    await srv.stop(None)


async def _open(port: int) -> H2Stream:
    return await open_stream("127.0.0.1", port, "/t.Echo/Run", (("x-test-token", "t0k"),))


async def test_echo_small_empty_and_larger_than_every_window(server: int) -> None:
    stream = await _open(server)
    big = random.Random(1).randbytes(3 * 1024 * 1024)  # > the server's windows: sent as they open
    sent = [b"hello", b"", big, b"x" * 70_000, b"after"]
    for msg in sent:
        stream.write(msg)
        if msg is big:
            assert len(stream._out) > 2 * 1024 * 1024  # held for WINDOW_UPDATEs
    got = [await asyncio.wait_for(stream.read(), 10) for _ in sent]
    assert got == sent
    stream.write(b"end")
    assert await asyncio.wait_for(stream.read(), 10) is None  # status OK ends the iteration
    assert await stream.read() is None
    stream.close()


async def test_many_messages_in_a_burst_arrive_whole_and_in_order(server: int) -> None:
    stream = await _open(server)
    stream.write(b"burst2000")
    stream.write(b"end")
    got = [msg async for msg in stream]
    assert got == [b"m%d" % i for i in range(2000)]
    stream.close()


async def test_error_status_and_message_from_trailers(server: int) -> None:
    stream = await _open(server)
    stream.write(b"one")
    assert await asyncio.wait_for(stream.read(), 10) == b"one"
    stream.write(b"abort")
    with pytest.raises(H2GrpcError) as err:
        await asyncio.wait_for(stream.read(), 10)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert err.value.details == "nö way: 100%"
    assert str(err.value) == "PERMISSION_DENIED: nö way: 100%"
    with pytest.raises(H2GrpcError):
        stream.write(b"more")
    stream.close()


async def test_close_wakes_a_reader_with_cancelled(server: int) -> None:
    stream = await _open(server)
    reader = asyncio.create_task(stream.read())
    await asyncio.sleep(0.05)
    stream.close()
    with pytest.raises(H2GrpcError) as err:
        await asyncio.wait_for(reader, 5)
    assert err.value.code == CANCELLED


async def test_connection_lost_is_unavailable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    srv = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        stream = await open_stream("127.0.0.1", port, "/t.Echo/Run")
        with pytest.raises(H2GrpcError) as err:
            await asyncio.wait_for(stream.read(), 5)
        assert err.value.code == UNAVAILABLE
        stream.close()
    finally:
        srv.close()
        await srv.wait_closed()


def _framed(msgs: list[bytes]) -> bytes:
    return b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in msgs)


@pytest.mark.parametrize("chunker", ["every-split", "random"])
async def test_reassembly_across_and_within_data_frames(chunker: str) -> None:
    big = bytes(range(256)) * (4 if chunker == "every-split" else 300)
    msgs = [b"", b"a", b"bc" * 3, big, b"", b"z" * 5]
    wire = _framed(msgs)
    cuts: list[Callable[[], list[int]]]
    if chunker == "every-split":
        cuts = [lambda i=i: [i] for i in range(1, len(wire))]
    else:
        rnd = random.Random(7)
        cuts = [lambda: sorted(rnd.sample(range(1, len(wire)), rnd.randint(2, 40))) for _ in range(200)]
    for cut in cuts:
        stream = H2Stream("x:1", "/t.Echo/Run")
        points = [0, *cut(), len(wire)]
        for a, b in zip(points, points[1:], strict=False):
            stream._feed(wire[a:b])
        got: list[Any] = list(stream._msgs)
        assert got == msgs, points
        assert not stream._buf and stream._need == 5
