"""Real Envoys for the benchmarks: many gateways (``--concurrency 1``) bootstrapped against one xdsd,
cheap upstream apps to route to, and a cheap poller that finds when every Envoy routes to a new one.

At 150-200 Envoys the usual test helpers (an aiohttp upstream, aiohttp polling every 2 ms) would
measure themselves: here the upstream apps are a bare asyncio protocol answering a fixed response
(``x-app: NAME``), and each Envoy is polled over one keep-alive HTTP/1.1 connection, one request at
a time, as fast as they answer. Everything but xdsd shares the other core, so a poll round over N
Envoys takes time: the figures' resolution is reported with them (``round_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port
from xdsd.bootstrap import BootstrapOptions, render

_REQUEST = b"GET /x HTTP/1.1\r\nhost: bench\r\n\r\n"


class _App(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.response = (f"HTTP/1.1 200 OK\r\nx-app: {name}\r\ncontent-length: 2\r\n\r\nok").encode()
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")  # requests without bodies (GET)
        if n and self.transport is not None:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(self.response * n)


async def _serve_apps(conn: Connection, apps: dict[str, tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda n=name: _App(n), host, port, backlog=4096)
               for name, (host, port) in apps.items()]
    conn.send("ready")
    await loop.run_in_executor(None, conn.recv)
    for s in servers:
        s.close()


def _apps_main(conn: Connection, apps: dict[str, tuple[str, int]]) -> None:
    try:
        import uvloop

        uvloop.run(_serve_apps(conn, apps))
    except ImportError:  # pragma: no cover
        asyncio.run(_serve_apps(conn, apps))


class FastUpstreams:
    """Named apps on their own loopback addresses (``{"blue": "127.0.0.2"}``), in a child process."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.apps = {name: (host, free_port(host)) for name, host in hosts.items()}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_apps_main, args=(child, self.apps), daemon=True)
        self._proc.start()
        if not self._conn.poll(30) or self._conn.recv() != "ready":
            raise RuntimeError("upstream apps did not start")

    def address(self, name: str) -> tuple[str, int]:
        return self.apps[name]

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send("stop")
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()


@contextlib.contextmanager
def gateway_envoys(count: int, xds_port: int, token: Any, workdir: Path, timeout: float = 300.0) -> Iterator[None]:
    """``count`` Envoys, gateways ``gw-000``.. (their listeners are where the mesh says, see
    ``gateway_mesh``), bootstrapped against ``127.0.0.1:xds_port`` (plaintext); ``token(node_id,
    cluster)`` mints their tokens. Yields once every one is live; stops them all on exit."""
    envoys: list[EnvoyProcess] = []
    (workdir / "envoys").mkdir(exist_ok=True)
    try:
        for i in range(count):
            name = gateway_name(i)
            opts = BootstrapOptions(node_id=f"{name}-1", cluster=name, xds_host="127.0.0.1", xds_port=xds_port,
                                    admin_port=free_port(), token=token(f"{name}-1", name), xds_plaintext=True)
            envoys.append(EnvoyProcess(f"{name}-1", render(opts), workdir / "envoys").start(wait_live=False))
        deadline = time.monotonic() + timeout
        for e in envoys:
            e.wait_live(max(1.0, deadline - time.monotonic()))
        yield
    finally:
        for e in envoys:
            e.stop()


def gateway_name(i: int) -> str:
    return f"gw-{i:03d}"


def gateway_mesh(ports: list[int], fillers: int = 20) -> dict[str, Any]:
    """Gateways routing ``/`` to service ``target``, and ``fillers`` services of 2 endpoints each that
    nobody calls: a real mesh has other services, and without them moving ``target`` to another
    endpoint in the file removes all of the file's endpoints, a change xdsd holds for ``--settle``."""
    services: dict[str, Any] = {"target": {}}
    for i in range(fillers):
        services[f"filler-{i:02d}"] = {"endpoints": [{"address": f"10.99.{i}.{j + 1}", "port": 8080} for j in range(2)]}
    return {"services": services,
            "gateways": {gateway_name(i): {"listen": {"address": "127.0.0.1", "port": p},
                                           "routes": [{"prefix": "/", "service": "target"}]}
                         for i, p in enumerate(ports)}}


def envoy_pids() -> list[int]:
    """Every running Envoy started by this process (children of ours named envoy)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if name == "envoy" and ppid == me:
            found.append(int(entry))
    return found


class _Poller:
    """One keep-alive connection to one Envoy's listener."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def app(self) -> str | None:
        """The x-app of one answer through this Envoy (None: no answer, reconnect next time)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(_REQUEST)
            head = await self.reader.readuntil(b"\r\n\r\n")
            app = None
            length = 0
            for line in head.split(b"\r\n"):
                low = line.lower()
                if low.startswith(b"x-app:"):
                    app = line.split(b":", 1)[1].strip().decode()
                elif low.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await self.reader.readexactly(length)
            if b"connection: close" in head.lower():
                self.close()
            return app
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Fleet:
    """Pollers for every Envoy, kept across changes (their connections stay open)."""

    def __init__(self, ports: list[int]) -> None:
        self.pollers = [_Poller(p) for p in ports]
        self.polls = 0  # requests made by the last until_all
        self.wall = 0.0  # how long the last until_all polled

    async def until_all(self, app: str, timeout: float, t0: float | None = None) -> list[float | None]:
        """Seconds from ``t0`` until each Envoy answered from ``app`` (None: not within ``timeout``)."""
        start = time.monotonic() if t0 is None else t0
        deadline = start + timeout
        self.polls = 0

        async def one(p: _Poller) -> float | None:
            while time.monotonic() < deadline:
                self.polls += 1
                if await p.app() == app:
                    return time.monotonic() - start
                await asyncio.sleep(0)
            return None

        began = time.monotonic()
        got = list(await asyncio.gather(*(one(p) for p in self.pollers)))
        self.wall = time.monotonic() - began
        return got

    @property
    def round_ms(self) -> float:
        """How long one poll of every Envoy took, on average, in the last until_all (the resolution)."""
        rounds = self.polls / max(1, len(self.pollers))
        return self.wall / rounds * 1000 if rounds else 0.0

    def close(self) -> None:
        for p in self.pollers:
            p.close()
