"""The load generator's grpc-core client: one ``grpc.aio`` channel per stream, with the interface of
bench.h2grpc's ``H2Stream`` (``write(bytes)`` without waiting, ``async for`` raw messages, ``close()``).

This is what users run: proxyless gRPC (the xDS client in grpc-core) and Envoy's ``google_grpc``
client are grpc-core channels with their default HTTP/2 habits -- BDP probe PINGs while data flows,
WINDOW_UPDATEs as the application reads, its own SETTINGS -- which bench.h2grpc does not have
(it sends an ACK and nothing else). The benchmark runs every fan-out and storm with both clients.

Each channel has a local subchannel pool (``grpc.use_local_subchannel_pool``): otherwise grpc-core
shares one TCP connection among channels to the same target, and 1,000 "proxies" would be one
connection. Messages are raw bytes (no serializers): the load generator parses them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from bench.h2grpc import CANCELLED, UNAVAILABLE, H2GrpcError

# grpc-core's defaults are kept (that is the point); only the subchannel is made per channel.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)


class GrpcStream:
    """One grpc.aio channel (its own connection) carrying one bidirectional call of raw messages."""

    def __init__(self, channel: grpc.aio.Channel, method: str, metadata: Iterable[tuple[str, str]]) -> None:
        self._channel = channel
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        multi = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._call = multi(self._requests(), metadata=tuple(metadata))
        self._closed = False

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            yield msg

    def write(self, msg: bytes) -> None:
        """Queue one message; grpc's request consumer writes it (as a sidecar's xDS client would)."""
        if self._closed:
            raise H2GrpcError(CANCELLED, "closed by the client")
        self._queue.put_nowait(msg)

    def __aiter__(self) -> GrpcStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise H2GrpcError(exc.code().value[0], exc.details() or "") from None
        except asyncio.InvalidStateError as exc:  # read after the call ended
            raise H2GrpcError(CANCELLED, str(exc)) from None
        if msg is grpc.aio.EOF:
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                raise H2GrpcError(code.value[0], await self._call.details() or "")
            raise StopAsyncIteration
        return bytes(msg)

    def close(self) -> None:
        """Cancel the call and close the channel (in the background: close is a coroutine)."""
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        self._queue.put_nowait(None)
        task = asyncio.get_running_loop().create_task(self._channel.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


async def open_grpc_stream(host: str, port: int, path: str, metadata: Iterable[tuple[str, str]] = (),
                           options: Iterable[tuple[str, Any]] = ()) -> GrpcStream:
    """A channel of its own to ``host:port`` and the call started on it (plaintext)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = grpc.aio.insecure_channel(target, options=[*CHANNEL_OPTIONS, *options])
    try:
        return GrpcStream(channel, path, metadata)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await channel.close()
        raise H2GrpcError(UNAVAILABLE, f"cannot start the call: {exc!r}") from exc
