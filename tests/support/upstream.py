"""Upstream apps whose status, latency and failure rate a test controls.

One subprocess hosts several named apps: ``python -m tests.support.upstream --listen NAME=HOST:PORT ...``.
Every path answers 200 with ``{"app": NAME, ...}`` and header ``x-app: NAME``, unless the app was told
otherwise through ``POST /__control`` (``status``, ``failure_rate``, ``failure_status``, ``latency_ms``).
``GET /__stats`` returns the number of requests the app served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import Proc, free_port, wait_for


@dataclass
class Behaviour:
    status: int = 200
    failure_rate: float = 0.0
    failure_status: int = 503
    latency_ms: int = 0
    requests: int = 0


async def _serve(apps: dict[str, tuple[str, int]]) -> None:
    from aiohttp import web

    runners = []
    for name, (host, port) in apps.items():
        behaviour = Behaviour()

        async def control(request: web.Request, b: Behaviour = behaviour) -> web.Response:
            body = await request.json()
            for key in ("status", "failure_rate", "failure_status", "latency_ms"):
                if key in body:
                    setattr(b, key, type(getattr(b, key))(body[key]))
            if body.get("reset_stats"):
                b.requests = 0
            return web.json_response({"ok": True})

        async def stats(_: web.Request, b: Behaviour = behaviour) -> web.Response:
            return web.json_response({"requests": b.requests})

        async def handle(request: web.Request, b: Behaviour = behaviour, app_name: str = name) -> web.Response:
            b.requests += 1
            if b.latency_ms:
                await asyncio.sleep(b.latency_ms / 1000)
            status = b.status
            if b.failure_rate and random.random() < b.failure_rate:
                status = b.failure_status
            body = {"app": app_name, "path": request.path_qs, "headers": dict(request.headers)}
            return web.json_response(body, status=status, headers={"x-app": app_name})

        app = web.Application()
        app.router.add_post("/__control", control)
        app.router.add_get("/__stats", stats)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", required=True, metavar="NAME=HOST:PORT")
    args = parser.parse_args(argv)
    apps = {}
    for spec in args.listen:
        name, _, addr = spec.partition("=")
        host, _, port = addr.rpartition(":")
        apps[name] = (host, int(port))
    asyncio.run(_serve(apps))


class Upstreams:
    """Starts the app farm; ``addresses[name]`` is (host, port)."""

    def __init__(self, apps: dict[str, str], workdir: Path) -> None:
        """``apps``: name -> host (a free port is picked) or "host:port"."""
        self.addresses: dict[str, tuple[str, int]] = {}
        for name, where in apps.items():
            host, _, port = where.partition(":")
            self.addresses[name] = (host, int(port) if port else free_port(host))
        listen = [f"--listen={n}={h}:{p}" for n, (h, p) in self.addresses.items()]
        root = Path(__file__).resolve().parents[2]
        self.proc = Proc("upstreams", [sys.executable, "-m", "tests.support.upstream", *listen], workdir / "upstreams.log")
        self.proc.cmd = ["env", f"PYTHONPATH={root}", *self.proc.cmd]

    def start(self) -> Upstreams:
        self.proc.start()
        for name in self.addresses:
            wait_for(lambda n=name: self.stats(n) is not None or self.proc.check_alive(), f"upstream {name}", 20)
        return self

    def url(self, name: str, path: str = "/") -> str:
        host, port = self.addresses[name]
        return f"http://{host}:{port}{path}"

    def set(self, name: str, **behaviour: object) -> None:
        req = urllib.request.Request(
            self.url(name, "/__control"), data=json.dumps(behaviour).encode(), method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    def stats(self, name: str) -> int:
        with urllib.request.urlopen(self.url(name, "/__stats"), timeout=2) as resp:
            return int(json.loads(resp.read())["requests"])

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> Upstreams:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
