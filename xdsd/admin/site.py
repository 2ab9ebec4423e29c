"""The admin port's listening socket, with the same kind of bounds as the other ports: connections in
all and per source address, an idle limit and a lifetime limit (aiohttp keeps a connection as long
as a client trickles bytes into a request head, and 3,630 s between requests by default)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from typing import Any

from aiohttp import web

MAX_CONNECTIONS = 1024
MAX_PER_SOURCE = 64
IDLE_SECONDS = 30.0  # no bytes from the client
LIFETIME_SECONDS = 300.0  # any connection (clients reconnect: registration calls, scrapes)
KEEPALIVE_SECONDS = 15.0  # between requests (aiohttp's own timer)
SWEEP_SECONDS = 5.0


def _source(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else host


class Limiter:
    def __init__(self, max_connections: int = MAX_CONNECTIONS, max_per_source: int = MAX_PER_SOURCE) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.open: set[_Limited] = set()
        self.per_source: dict[str, int] = {}
        self.refused = 0

    def admit(self, conn: _Limited) -> bool:
        if len(self.open) >= self.max_connections or self.per_source.get(conn.source, 0) >= self.max_per_source:
            self.refused += 1
            return False
        self.open.add(conn)
        self.per_source[conn.source] = self.per_source.get(conn.source, 0) + 1
        return True

    def release(self, conn: _Limited) -> None:
        if conn in self.open:
            self.open.discard(conn)
            left = self.per_source.get(conn.source, 1) - 1
            if left > 0:
                self.per_source[conn.source] = left
            else:
                self.per_source.pop(conn.source, None)

    def sweep(self, now: float) -> None:
        for conn in [c for c in self.open if now - c.last > IDLE_SECONDS or now - c.started > LIFETIME_SECONDS]:
            conn.close()


class _Limited(asyncio.Protocol):
    """Admits or refuses a connection, then hands everything to aiohttp's handler."""

    def __init__(self, inner: Any, limiter: Limiter) -> None:
        self.inner = inner
        self.limiter = limiter
        self.transport: asyncio.BaseTransport | None = None
        self.source = "?"
        self.started = self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.source = _source(transport)
        if not self.limiter.admit(self):
            self.inner = None
            transport.close()
            return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.limiter.release(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class LimitedSite(web.BaseSite):
    """``web.TCPSite`` with a ``Limiter`` in front of aiohttp's handlers."""

    __slots__ = ("_host", "_port", "limiter", "_sweeper")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limiter: Limiter | None = None) -> None:
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self.limiter = limiter or Limiter()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        server = self._server
        if server is not None and getattr(server, "sockets", None):
            return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        factory = self._runner.server
        assert factory is not None
        self._server = await loop.create_server(lambda: _Limited(factory(), self.limiter), self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.limiter.sweep(time.monotonic())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await super().stop()
