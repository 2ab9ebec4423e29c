"""The admin port bounds its connections: per source address and in all; others are still served."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from xdsd.admin import site as admin_site
from xdsd.admin.site import LimitedSite, Limiter


async def _get(host: str, port: int, source: str) -> int | None:
    """One GET /ok from ``source``; the status, or None if the connection was refused or closed."""
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        return None
    writer.write(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
    except (TimeoutError, ConnectionError):
        return None
    finally:
        writer.close()
    return int(line.split()[1]) if line else None


async def test_per_source_and_total_limits_and_idle_sweep() -> None:
    app = web.Application()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/ok", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    limiter = Limiter(max_connections=6, max_per_source=3)
    site = LimitedSite(runner, "127.0.0.1", 0, limiter)
    await site.start()
    port = site.port
    idle: list[socket.socket] = []
    try:
        for _ in range(3):  # an idle client from 127.0.0.5 takes its share
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.5", 0))
            idle.append(s)
        for _ in range(50):
            if len(limiter.open) == 3:
                break
            await asyncio.sleep(0.02)
        assert await _get("127.0.0.1", port, "127.0.0.5") is None  # its fourth is refused
        assert await _get("127.0.0.1", port, "127.0.0.6") == 200  # another source is served
        assert limiter.refused >= 1
        limiter.sweep(asyncio.get_running_loop().time() + 1e6)  # idle past every limit: closed
        for _ in range(50):
            if not limiter.open:
                break
            await asyncio.sleep(0.02)
        assert not limiter.open
        assert await _get("127.0.0.1", port, "127.0.0.5") == 200  # and the source is welcome again
    finally:
        for s in idle:
            s.close()
        await site.stop()
        await runner.cleanup()


def test_the_defaults_are_bounded() -> None:
    assert admin_site.MAX_CONNECTIONS <= 4096 and admin_site.MAX_PER_SOURCE <= 256
    assert admin_site.IDLE_SECONDS <= 60 and admin_site.KEEPALIVE_SECONDS <= 60
