"""Upstream apps whose status, latency and failure rate a test controls.

One subprocess hosts several named apps: ``python -m tests.support.upstream --listen NAME=HOST:PORT ...``.
Every path answers 200 with ``{"app": NAME, "path": ..., "method": ..., "headers": {lower-case: ...}}`` and header ``x-app: NAME``,
unless the app was told otherwise through ``POST /__control`` with a JSON object of any of
``status``, ``failure_rate`` (0..1), ``failure_status``, ``latency_ms``, ``reset`` (back to defaults),
``reset_stats`` (request count to 0), ``forward_to`` (a base URL: each request is also made there,
with the trace context headers passed on, as a traced app would; its answer is under ``"onward"``). ``GET /__stats`` returns ``{"app": NAME, "requests": N}``: the
requests the app served (control and stats calls not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.ports import port_open
from tests.support.procs import Proc, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Behaviour:
    status: int = 200
    failure_rate: float = 0.0
    failure_status: int = 503
    latency_ms: int = 0
    forward_to: str = ""
    requests: int = 0


_CONTROL_KEYS = ("status", "failure_rate", "failure_status", "latency_ms", "forward_to")
# What an app passes on when it calls onward, so that a trace continues across services.
TRACE_HEADERS = ("traceparent", "tracestate", "x-request-id", "baggage")


def _make_app(app_name: str) -> Any:
    from aiohttp import web

    b = Behaviour()

    async def control(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "expected a JSON object"}, status=400)
        if not isinstance(body, dict) or set(body) - {*_CONTROL_KEYS, "reset", "reset_stats"}:
            return web.json_response({"error": f"allowed keys: {_CONTROL_KEYS} reset reset_stats"}, status=400)
        if body.get("reset"):
            requests = b.requests
            b.__init__()  # type: ignore[misc]
            b.requests = requests
        for key in _CONTROL_KEYS:
            if key in body:
                setattr(b, key, type(getattr(b, key))(body[key]))
        if body.get("reset_stats"):
            b.requests = 0
        return web.json_response({"ok": True, "app": app_name})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"app": app_name, "requests": b.requests})

    async def handle(request: web.Request) -> web.Response:
        b.requests += 1
        if b.latency_ms:
            await asyncio.sleep(b.latency_ms / 1000)
        status = b.status
        if b.failure_rate and random.random() < b.failure_rate:
            status = b.failure_status
        await request.read()
        body = {"app": app_name, "path": request.path_qs, "method": request.method, "headers": {k.lower(): v for k, v in request.headers.items()}}
        if b.forward_to:
            body["onward"] = await _forward(b.forward_to + request.path_qs, request.headers)
        return web.json_response(body, status=status, headers={"x-app": app_name})

    app = web.Application()
    app.router.add_post("/__control", control)
    app.router.add_get("/__stats", stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _forward(url: str, headers: Mapping[str, str]) -> Any:
    from aiohttp import ClientSession, ClientTimeout

    passed = {h: headers[h] for h in TRACE_HEADERS if h in headers}
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as session, session.get(url, headers=passed) as resp:
            return {"status": resp.status, "body": await resp.json(content_type=None)}
    except Exception as exc:  # the caller sees what went wrong
        return {"status": 0, "error": repr(exc)}


async def _serve(apps: Mapping[str, tuple[str, int]]) -> None:
    from aiohttp import web

    runners = []
    for name, (host, port) in apps.items():
        runner = web.AppRunner(_make_app(name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    print("ready " + " ".join(f"{n}={h}:{p}" for n, (h, p) in apps.items()), flush=True)
    await asyncio.Event().wait()


def _parse_listen(spec: str) -> tuple[str, tuple[str, int]]:
    name, sep, addr = spec.partition("=")
    host, _, port = addr.rpartition(":")
    if not sep or not name or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {spec!r}")
    return name, (host, int(port))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.upstream")
    parser.add_argument("--listen", action="append", required=True, metavar="NAME=HOST:PORT", type=_parse_listen)
    args = parser.parse_args(argv)
    apps = dict(args.listen)
    if len(apps) != len(args.listen):
        parser.error("app names must be unique")
    asyncio.run(_serve(apps))


class Upstreams:
    """Starts the app farm in one subprocess; ``addresses[name]`` is (host, port).

    ``apps``: name -> host (a free port is picked there) or "host:port"; or just names (all on
    127.0.0.1). Usable as a context manager (starts on enter, stops on exit).
    """

    def __init__(self, apps: Mapping[str, str] | Iterable[str], workdir: Path | None = None) -> None:
        if not isinstance(apps, Mapping):
            apps = {name: "127.0.0.1" for name in apps}
        if not apps:
            raise ValueError("Upstreams needs at least one app")
        self.addresses: dict[str, tuple[str, int]] = {}
        for name, where in apps.items():
            host, _, port = where.partition(":")
            self.addresses[name] = (host, int(port) if port else free_port(host))
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="upstreams-"))
        listen = [f"--listen={n}={h}:{p}" for n, (h, p) in self.addresses.items()]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        log = self.workdir / "upstreams.log"
        if log.exists():  # a second farm in the same workdir keeps its own log
            log = self.workdir / f"upstreams-{'-'.join(self.addresses)}-{os.getpid()}-{id(self)}.log"
        self.proc = Proc("upstreams", [sys.executable, "-m", "tests.support.upstream", *listen], log, env=env, cwd=ROOT)

    def start(self, timeout: float = 30.0) -> Upstreams:
        """Starts the subprocess and waits until every app accepts connections and answers."""
        self.proc.start()
        try:
            for name, (host, port) in self.addresses.items():
                def up(n: str = name, h: str = host, p: int = port) -> bool:
                    self.proc.check_alive()
                    return port_open(h, p) and self.stats(n) >= 0

                wait_for(up, f"upstream app {name} on {host}:{port}", timeout)
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- upstreams log ---\n{self.proc.log_tail()}") from None
        return self

    def address(self, name: str) -> tuple[str, int]:
        return self.addresses[name]

    def port(self, name: str) -> int:
        return self.addresses[name][1]

    def url(self, name: str, path: str = "/") -> str:
        host, port = self.addresses[name]
        return f"http://{host}:{port}{path}"

    def _control(self, name: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(
            self.url(name, "/__control"), data=json.dumps(body).encode(), method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    def set(self, name: str, **behaviour: Any) -> None:
        """Changes one app's behaviour: ``status``, ``failure_rate``, ``failure_status``, ``latency_ms``
        (unnamed settings keep their value; ``reset=True`` first restores the defaults)."""
        self._control(name, behaviour)

    def reset(self, name: str | None = None) -> None:
        """Default behaviour and request count 0, for one app or all."""
        for n in [name] if name else list(self.addresses):
            self._control(n, {"reset": True, "reset_stats": True})

    def stats(self, name: str) -> int:
        """Requests served by the app so far."""
        with urllib.request.urlopen(self.url(name, "/__stats"), timeout=5) as resp:
            return int(json.loads(resp.read())["requests"])

    def all_stats(self) -> dict[str, int]:
        return {name: self.stats(name) for name in self.addresses}

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> Upstreams:
        return self if self.proc.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
