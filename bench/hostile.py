"""Hostile clients against a real ``xdsd serve`` process (issue 16).

    .venv/bin/python -m bench.hostile [--only flood|flood-token|authz|names ...] [--out bench/results/hostile.json]

xdsd runs as ``xdsd serve --xds-plaintext --authz-http-address 127.0.0.1:<port>`` (``--auth required``,
real tokens) on a small mesh (8 services, a gateway ``edge``), a fresh process per scenario. The
attacking clients run in a child process (``--attacker``) so that they do not share an event loop
or the GIL with the clients that measure; those (an authenticated ADS client, a ``/readyz`` poller,
the RSS sampler) run here. Every scenario reports xdsd's RSS (VmRSS) before, at its peak during
(VmHWM, reset at the start, and a 20 ms sampler) and 2 s after the attack, and its longest
event-loop stall (``/debug/loop?reset=1``).

Scenarios:
  flood        64 ADS streams (4 connections x 16) without a token, each sending 15 MiB of a message
               that declares 16 MiB, for 8 s; then the same with a client that reopens every refused
               stream and reconnects every closed connection. Meanwhile an authenticated client
               (gateway ``edge``) opens a new connection every 0.5 s and times its first response.
  flood-token  the same flood with a valid node token (16 MiB declared: over the 4 MiB message limit);
               then 64 streams (16 connections x 4) declaring 4 MiB (the limit) and sending 15/16 of
               it, reopening what is given up: the partly received messages the process holds are
               capped (128 MiB).
  authz        4,100 idle TCP connections to the authz HTTP port (from one source address, then spread
               over five), then 100 new connections with one valid check each, and 100 checks on a
               keep-alive connection opened before: how many are answered.
  names        8 ADS streams (valid tokens) each sending one DiscoveryRequest of ~4 MiB of tiny EDS
               resource names, written at once; then the 8 messages made to complete in the same
               instant; then 8 requests of 100,000 names (the most a stream may subscribe to)
               completing together. The longest loop stall and a concurrent ``/readyz`` client's
               worst latency.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import yaml

from bench import meshgen
from bench.h2grpc import STATUS_NAMES, H2GrpcError, open_stream
from bench.loadgen import ADS, CDS, EDS
from bench.xds import Probe
from tests.support.procs import free_port
from tests.support.xdsd_proc import XdsdProcess

ROOT = Path(__file__).resolve().parents[1]
ADS_PATH = ADS + "StreamAggregatedResources"
TRUST_DOMAIN = "mesh.local"
MiB = 1 << 20
TOKEN_HEADER = "x-xdsd-token"
# The largest request message xdsd takes (xdsd.app.MAX_RECEIVE_MESSAGE; not imported: the bench
# measures the process from outside).
MAX_MESSAGE = 4 * MiB
MAX_NAMES = 100_000  # names per type and stream (xdsd.server.stream.MAX_NAMES)
ANSWER_WAIT = 5.0  # seconds a huge request's stream waits for an answer


def _mb(n: float) -> float:
    return round(n / MiB, 1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _lat_summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    got = sorted(values)
    return {"n": len(got), "p50_ms": _ms(got[len(got) // 2]), "max_ms": _ms(got[-1]),
            "mean_ms": _ms(statistics.fmean(got))}


# -- the xdsd process -------------------------------------------------------------------------------


def hostile_mesh(authz_caller: str) -> dict[str, Any]:
    """8 services x 2 endpoints, a gateway ``edge``, and a policy on svc-0001 (GET from ``authz_caller``)."""
    mesh = meshgen.mesh(8, 2, upstreams=3)
    mesh["mesh"]["trust_domain"] = TRUST_DOMAIN
    names = list(mesh["services"])
    mesh["gateways"] = {"edge": {"listen": {"address": "127.0.0.1", "port": free_port()},
                                 "routes": [{"prefix": f"/{n}", "service": n} for n in names[:4]]}}
    mesh["authorization"] = {names[1]: {"default": "deny", "rules": [
        {"name": "caller-get", "allow": {"from": [authz_caller], "methods": ["GET"]}}]}}
    return mesh


class Target:
    """A fresh ``xdsd serve`` on free ports (xDS in plaintext, the authz HTTP port on), and its RSS."""

    AUTHZ_SERVICE = meshgen.service_name(1)
    AUTHZ_CALLER = meshgen.service_name(2)

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "mesh.yaml"
        path.write_text(yaml.safe_dump(hostile_mesh(self.AUTHZ_CALLER), sort_keys=False))
        self.authz_port = free_port()
        self.xdsd = XdsdProcess(path, workdir, log_level="warning",
                                extra_args=["--xds-plaintext", "--authz-http-address", f"127.0.0.1:{self.authz_port}"])

    def __enter__(self) -> Target:
        self.xdsd.start(timeout=60)
        pid = self.xdsd.proc.pid
        assert pid is not None
        self.probe = Probe(pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.xdsd.stop()

    @property
    def xds_port(self) -> int:
        return self.xdsd.xds_port

    def loop_stall(self) -> dict[str, float | None]:
        """Longest event-loop stall and GC pause (ms) since the last call."""
        got = self.xdsd.admin_get_json("/debug/loop?reset=1")
        return {"loop_stall_ms": _ms(float(got["max_stall_seconds"])),
                "max_gc_ms": _ms(float(got.get("max_gc_seconds", 0.0)))}

    def edge_token(self, node_id: str) -> str:
        return self.xdsd.token(node_id, "edge")


class RssWatch:
    """xdsd's RSS before, at its peak during (VmHWM reset at the start, and sampled every 20 ms),
    and after a block."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.before = probe.rss()
        self.samples: list[int] = []
        self._stop = threading.Event()
        probe.reset_peak()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.probe.rss())
            except OSError:
                return
            self._stop.wait(0.02)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the figures so far (``after`` is read separately: see ``after``)."""
        self._stop.set()
        self._thread.join()
        peak = max([self.probe.peak(), *self.samples])
        return {"rss_before_mb": _mb(self.before), "rss_peak_mb": _mb(peak)}

    def after(self, wait: float = 2.0) -> dict[str, float]:
        time.sleep(wait)
        return {"rss_after_mb": _mb(self.probe.rss())}


# -- measuring clients (this process) ---------------------------------------------------------------


def _discovery_request(node_id: str, cluster: str, type_url: str) -> bytes:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id, cluster=cluster),
                                          type_url=type_url).SerializeToString()


async def ads_once(port: int, token: str, node_id: str, timeout: float = 10.0) -> float:
    """A new connection, one ADS stream, a CDS request as gateway ``edge``: seconds until its response."""
    start = time.perf_counter()
    stream = await asyncio.wait_for(open_stream("127.0.0.1", port, ADS_PATH, ((TOKEN_HEADER, token),)), timeout)
    try:
        stream.write(_discovery_request(node_id, "edge", CDS))
        got = await asyncio.wait_for(stream.read(), timeout - (time.perf_counter() - start))
        if got is None:
            raise H2GrpcError(2, "the stream ended without a response")
        return time.perf_counter() - start
    finally:
        stream.close()


async def ads_prober(port: int, token: str, node_id: str, until: float, interval: float = 0.5) -> dict[str, Any]:
    """``ads_once`` every ``interval`` seconds until ``until`` (monotonic): the latencies and failures."""
    lat: list[float] = []
    errors: list[str] = []
    while time.monotonic() < until:
        try:
            lat.append(await ads_once(port, token, node_id))
        except (OSError, TimeoutError, H2GrpcError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(interval)
    return {"responses": len(lat), "failures": len(errors), **_lat_summary(lat), "errors": errors[:5]}


class ReadyzPoller:
    """GET /readyz on the admin port every 5 ms in a thread: the worst latency."""

    def __init__(self, url: str) -> None:
        self.url = url + "/readyz"
        self.lat: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    resp.read()
            except (OSError, urllib.error.URLError) as exc:
                self.errors.append(repr(exc)[:200])
            self.lat.append(time.perf_counter() - start)
            self._stop.wait(0.005)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"requests": len(self.lat), **_lat_summary(self.lat), "errors": self.errors[:3]}


@contextmanager
def attacker(kind: str, config: dict[str, Any], timeout: float) -> Iterator[Attacker]:
    """The attacking client as a child process (``--attacker``); killed on the way out."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "bench.hostile", "--attacker", json.dumps({"kind": kind, **config})],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield Attacker(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class Attacker:
    """The child's protocol: it prints ``ready`` once connected, attacks on ``go``, prints its JSON."""

    def __init__(self, proc: Any, timeout: float) -> None:
        self.proc = proc
        self.deadline = time.monotonic() + timeout

    def _line(self) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, self.deadline - time.monotonic()))
        if not result or not result[0]:
            raise RuntimeError("the attacker did not answer in time (or died)")
        return result[0].strip()

    def ready(self) -> None:
        line = self._line()
        if line != "ready":
            raise RuntimeError(f"attacker: {line!r}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        return dict(json.loads(self._line()))


# -- scenarios -------------------------------------------------------------------------------------


def flood(workdir: Path, *, token: bool, connections: int, per_connection: int, declared: int, body: int,
          retry: bool, seconds: float = 8.0) -> dict[str, Any]:
    """``connections`` x ``per_connection`` ADS streams each sending ``body`` bytes of a message that
    declares ``declared`` bytes, for ``seconds``; an authenticated client probes meanwhile."""
    with Target(workdir) as t:
        probe_token = t.edge_token("edge-probe")
        asyncio.run(ads_once(t.xds_port, probe_token, "edge-probe"))  # the gateway's snapshot is built
        time.sleep(0.5)
        config = {"port": t.xds_port, "connections": connections, "per_connection": per_connection,
                  "declared": declared, "body": body, "seconds": seconds, "retry": retry,
                  "token": t.edge_token("edge-attacker") if token else None}
        t.loop_stall()
        rss = RssWatch(t.probe)
        with attacker("flood", config, timeout=seconds + 15) as a:
            a.ready()
            a.go()
            probes = asyncio.run(ads_prober(t.xds_port, probe_token, "edge-probe", time.monotonic() + seconds))
            got = a.result()
        out = {"streams": connections * per_connection, "connections": connections, "token": token,
               "declared_mib": declared / MiB, "body_mib": body / MiB, "retry": retry, "seconds": seconds,
               **rss.stop(), **t.loop_stall(), "attacker": got, "authenticated_client": probes}
        out.update(rss.after())
        return out


def authz_exhaustion(workdir: Path, idle: int = 4100, checks: int = 100) -> dict[str, Any]:
    """Idle connections on the authz HTTP port from one source address and then from five; then
    ``checks`` new connections with one valid check each, and ``checks`` on an older keep-alive one."""
    out: dict[str, Any] = {"idle_connections": idle, "new_connection_checks": checks,
                           "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    with Target(workdir) as t:
        service, caller = Target.AUTHZ_SERVICE, Target.AUTHZ_CALLER
        token = t.xdsd.token(f"{service}-1", service)
        request = (f"GET /_xdsd/authz/{service}/x HTTP/1.1\r\nhost: {service}\r\n{TOKEN_HEADER}: {token}\r\n"
                   f"x-forwarded-client-cert: URI=spiffe://{TRUST_DOMAIN}/service/{caller}\r\n\r\n").encode()
        runs = []
        for label, sources in (("one source address", ["127.0.0.2"]),
                               ("five source addresses", [f"127.0.0.{i}" for i in range(2, 7)])):
            time.sleep(1.0)
            t.loop_stall()
            rss = RssWatch(t.probe)
            got = asyncio.run(_authz_run(t.authz_port, request, idle, checks, sources))
            run = {"idle_from": label, **got, **rss.stop(), **t.loop_stall()}
            run.update(rss.after(1.0))
            runs.append(run)
        out["runs"] = runs
    return out


async def _authz_check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> str:
    """One check on a connection: the answer's status code, or what happened instead."""
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
    except TimeoutError:
        return "no answer in 2 s"
    except asyncio.IncompleteReadError:
        return "closed without an answer"
    except OSError as exc:
        return type(exc).__name__
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "?"
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    if length:
        await reader.readexactly(length)
    return status


async def _authz_run(port: int, request: bytes, idle: int, checks: int, sources: list[str]) -> dict[str, Any]:
    kr, kw = await asyncio.open_connection("127.0.0.1", port)
    first = await _authz_check(kr, kw, request)  # authenticated before the flood of idle connections
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed_opens = collections.Counter[str]()

    async def one(source: str) -> None:
        try:
            held.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5))
        except (OSError, TimeoutError) as exc:
            failed_opens[type(exc).__name__] += 1

    started = time.monotonic()
    for base in range(0, idle, 256):
        await asyncio.gather(*(one(sources[i % len(sources)]) for i in range(base, min(idle, base + 256))))
    opened_in = time.monotonic() - started
    await asyncio.sleep(0.3)  # the server has accepted (and shed) them
    new: collections.Counter[str] = collections.Counter()
    lat: list[float] = []
    for _ in range(checks):
        start = time.perf_counter()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        except (OSError, TimeoutError) as exc:
            new[f"connect: {type(exc).__name__}"] += 1
            continue
        status = await _authz_check(r, w, request)
        new[status] += 1
        if status.isdigit():
            lat.append(time.perf_counter() - start)
        w.close()
    old = collections.Counter([await _authz_check(kr, kw, request) for _ in range(checks)])
    await asyncio.sleep(0.2)
    alive = sum(not r.at_eof() for r, _ in held)
    for _, w in held:
        w.close()
    kw.close()
    served = sum(n for s, n in new.items() if s.isdigit())
    return {"keepalive_first_check": first, "idle_opened": len(held), "idle_open_failures": dict(failed_opens),
            "idle_opened_in_s": round(opened_in, 2), "idle_still_open_after_checks": alive,
            "new_connections_served": served, "new_connection_outcomes": dict(new),
            "new_connection_latency": _lat_summary(lat),
            "keepalive_checks_served": sum(n for s, n in old.items() if s.isdigit()),
            "keepalive_outcomes": dict(old)}


def huge_names(workdir: Path, streams: int = 8, size: int = MAX_MESSAGE - 1024) -> dict[str, Any]:
    """``streams`` ADS streams (valid tokens), one DiscoveryRequest of ~``size`` bytes of tiny EDS
    names each: written at once, then made to complete together; then requests of 100,000 names
    (xdsd's limit per type and stream: the most a request can make it look at) completing together.
    A fresh xdsd for each (what one run leaves in memory would be the next one's "before")."""
    runs = []
    for k, (together, max_names) in enumerate(((False, None), (True, None), (True, MAX_NAMES))):
        with Target(workdir / f"run-{k}") as t:
            tokens = [(f"edge-names-{i}", t.edge_token(f"edge-names-{i}")) for i in range(streams)]
            config = {"port": t.xds_port, "streams": streams, "size": size, "together": together, "tokens": tokens,
                      "max_names": max_names}
            time.sleep(0.5)
            with attacker("names", config, timeout=60) as a:
                a.ready()  # payloads built, streams connected
                t.loop_stall()
                rss = RssWatch(t.probe)
                readyz = ReadyzPoller(t.xdsd.admin_url)
                try:
                    a.go()
                    got = a.result()
                    time.sleep(0.3)
                finally:
                    ready = readyz.stop()
                mode = "messages complete together" if together else "written at once"
                run = {"mode": mode if max_names is None else f"{max_names:,} names each, {mode}",
                       **rss.stop(), **t.loop_stall(), "readyz": ready, "attacker": got}
            run.update(rss.after(1.0))
            runs.append(run)
    return {"streams": streams, "request_bytes": size, "runs": runs}


# -- the attacking side (a child process) ----------------------------------------------------------


class FloodStats:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()  # every stream
        self.first: collections.Counter[str] = collections.Counter()  # the streams opened first
        self.first_ms: list[float] = []  # how long the first streams lived
        self.streams = 0
        self.connections = 0
        self.goaways: collections.Counter[str] = collections.Counter()
        self.closed_by_server = 0
        self.sent = 0  # request DATA the server's windows took


class FloodConnection:
    """One HTTP/2 connection of the flood: ``per_connection`` streams, each sending ``body`` bytes of
    a message declaring ``declared`` bytes as fast as the server's windows allow."""

    CHUNK = bytes(16384)

    def __init__(self, cfg: dict[str, Any], stats: FloodStats, first: bool) -> None:
        self.cfg = cfg
        self.stats = stats
        self.first = first  # its first streams count as the flood's first streams
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", ADS_PATH.encode()),
                   (b":authority", b"xdsd"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        if cfg.get("token"):
            headers.append((TOKEN_HEADER.encode(), cfg["token"].encode()))
        self.headers = headers
        self.sent: dict[int, int] = {}  # open streams: bytes sent
        self.opened: dict[int, float] = {}
        self.initial: set[int] = set()
        self.status: dict[int, str] = {}
        self.ended = False

    def _open(self) -> None:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, self.headers)
        self.sent[sid] = 0
        self.opened[sid] = time.monotonic()
        self.stats.streams += 1

    def _done(self, sid: int, outcome: str) -> None:
        if sid not in self.sent:
            return
        del self.sent[sid]
        outcome = self.status.pop(sid, outcome)
        self.stats.outcomes[outcome] += 1
        if sid in self.initial:
            self.stats.first[outcome] += 1
            self.stats.first_ms.append((time.monotonic() - self.opened[sid]) * 1000)
        self.opened.pop(sid, None)
        if self.cfg["retry"] and not self.ended:
            self._open()

    def _events(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                headers = dict(ev.headers or ())
                if b"grpc-status" in headers:
                    code = int(headers[b"grpc-status"])
                    self.status[ev.stream_id] = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)
            elif isinstance(ev, h2.events.StreamEnded):
                self._done(ev.stream_id, "ended without grpc-status")
            elif isinstance(ev, h2.events.StreamReset):
                self._done(ev.stream_id, f"RST_STREAM {getattr(ev.error_code, 'name', ev.error_code)}")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.stats.goaways[str(getattr(ev.error_code, "name", ev.error_code))] += 1
                self.ended = True

    def _send(self) -> None:
        cfg, h2c = self.cfg, self.h2
        body, declared = cfg["body"], cfg["declared"]
        for sid, sent in list(self.sent.items()):
            if sent >= body:
                continue
            try:
                room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size, body - sent)
                if room <= 0:
                    continue
                data = (b"\0" + declared.to_bytes(4, "big") + self.CHUNK)[:room] if sent == 0 else self.CHUNK[:room]
                h2c.send_data(sid, data)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._done(sid, "closed")
                continue
            self.sent[sid] = sent + room
            self.stats.sent += room

    async def run(self, deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.cfg["port"])
        self.stats.connections += 1
        self.h2.initiate_connection()
        for _ in range(self.cfg["per_connection"]):
            self._open()
        if self.first:
            self.initial = set(self.sent)
        try:
            while time.monotonic() < deadline and not self.ended:
                self._send()
                out = self.h2.data_to_send()
                if out:
                    writer.write(out)
                    await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
                try:
                    data = await asyncio.wait_for(reader.read(1 << 16), 0.005 if self.sent else 0.1)
                except TimeoutError:
                    continue
                if not data:
                    self.stats.closed_by_server += 1
                    break
                self._events(data)
                out = self.h2.data_to_send()
                if out:
                    writer.write(out)
        except (ConnectionError, TimeoutError, h2.exceptions.ProtocolError):
            self.stats.closed_by_server += 1
        self.ended = True
        for sid in list(self.sent):
            self._done(sid, "connection closed" if time.monotonic() < deadline else "still open at the end")
        writer.close()


async def attack_flood(cfg: dict[str, Any]) -> dict[str, Any]:
    stats = FloodStats()
    await _wait_go()
    deadline = time.monotonic() + cfg["seconds"]

    async def lane(index: int) -> None:
        first = True
        while time.monotonic() < deadline:
            try:
                await FloodConnection(cfg, stats, first).run(deadline)
            except OSError:
                stats.outcomes["connect refused"] += 1
                await asyncio.sleep(0.05)
            first = False
            if not cfg["retry"]:
                break

    await asyncio.gather(*(lane(i) for i in range(cfg["connections"])))
    return {"streams_opened": stats.streams, "connections_opened": stats.connections,
            "first_streams": dict(stats.first), "first_streams_ended_ms": _lat_summary([x / 1000 for x in stats.first_ms]),
            "outcomes": dict(stats.outcomes), "goaway": dict(stats.goaways),
            "connections_closed_by_server": stats.closed_by_server, "sent_mib": round(stats.sent / MiB, 1)}


def _names_request(node_id: str, size: int, names: bytes, count: int) -> tuple[bytes, int]:
    """A DiscoveryRequest of at most ``size`` bytes: node, type EDS, and the first of ``names``
    (field 3 entries, each with a 1-byte length, ``count`` of them), cut at an entry."""
    head = _discovery_request(node_id, "edge", EDS)
    room = size - len(head)
    pos = n = 0
    while n < count and pos + 2 + names[pos + 1] <= room:
        pos += 2 + names[pos + 1]
        n += 1
    return head + names[:pos], n


async def attack_names(cfg: dict[str, Any]) -> dict[str, Any]:
    size = cfg["size"]
    parts = []
    count = 0
    total = 0
    while total < size and count < (cfg["max_names"] or size):
        name = format(count, "x").encode()
        parts.append(b"\x1a" + bytes([len(name)]) + name)
        total += len(parts[-1])
        count += 1
    names = b"".join(parts)
    payloads = [_names_request(node_id, size, names, count) for node_id, _ in cfg["tokens"]]
    streams = [await open_stream("127.0.0.1", cfg["port"], ADS_PATH, ((TOKEN_HEADER, token),))
               for _, token in cfg["tokens"]]
    await _wait_go()
    start = time.perf_counter()
    if cfg["together"]:
        # Everything but each message's last byte; once the server has taken all of it, the last
        # bytes of all at once: the messages complete in the same loop iteration.
        framed = [b"\0" + len(p).to_bytes(4, "big") + p for p, _ in payloads]
        for s, f in zip(streams, framed, strict=True):
            s._out += f[:-1]
            s._flush()
        for _ in range(300):  # at most 15 s
            if not any(s._out for s in streams):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        for s, f in zip(streams, framed, strict=True):
            s._out += f[-1:]
        for s in streams:
            s._flush()
    else:
        for s, (p, _) in zip(streams, payloads, strict=True):
            s.write(p)

    async def first(s: Any) -> tuple[str, float]:
        try:
            got = await asyncio.wait_for(s.read(), ANSWER_WAIT)
            outcome = "a response" if got is not None else "ended OK without a response"
        except H2GrpcError as exc:
            outcome = f"{exc.code_name}: {exc.details}"[:160]
        except TimeoutError:
            outcome = f"no answer within {ANSWER_WAIT:.0f} s (stream open)"
        return outcome, time.perf_counter() - start

    got = await asyncio.gather(*(first(s) for s in streams))
    for s in streams:
        s.close()
    return {"names_per_request": payloads[0][1], "request_bytes": len(payloads[0][0]),
            "outcomes": dict(collections.Counter(o for o, _ in got)),
            "answered_within_ms": _lat_summary([d for o, d in got if not o.startswith("no answer")])}


async def _wait_go() -> None:
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("attacker: no go")


def attacker_main(spec: str) -> None:
    cfg = json.loads(spec)
    run = {"flood": attack_flood, "names": attack_names}[cfg["kind"]]
    print(json.dumps(asyncio.run(run(cfg))), flush=True)


# -- main ------------------------------------------------------------------------------------------


def _timed(run: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``run(*args, **kwargs)`` (a scenario: its xdsd started and stopped) and its wall time."""
    started = time.monotonic()
    out = dict(run(*args, **kwargs))
    out["scenario_seconds"] = round(time.monotonic() - started, 1)
    return out


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=["flood", "flood-token", "authz", "names"],
                   help="run only these scenarios")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/hostile.json")
    p.add_argument("--attacker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.attacker:
        attacker_main(a.attacker)
        return
    _raise_nofile()  # xdsd and the attacker inherit it
    only = set(a.only or ["flood", "flood-token", "authz", "names"])
    results: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() and a.only else {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xdsd-hostile-") as tmp:
        work = Path(tmp)
        if "flood" in only:
            print("unauthenticated flood...", flush=True)
            results["flood_unauthenticated"] = [
                _timed(flood, work / "flood", token=False, connections=4, per_connection=16, declared=16 * MiB,
                      body=15 * MiB, retry=False),
                _timed(flood, work / "flood-retry", token=False, connections=4, per_connection=16, declared=16 * MiB,
                      body=15 * MiB, retry=True),
            ]
        if "flood-token" in only:
            print("flood with a valid token...", flush=True)
            results["flood_token"] = [
                _timed(flood, work / "flood-token", token=True, connections=4, per_connection=16, declared=16 * MiB,
                      body=15 * MiB, retry=False),
                _timed(flood, work / "flood-token-partial", token=True, connections=16, per_connection=4,
                      declared=MAX_MESSAGE, body=MAX_MESSAGE * 15 // 16, retry=True),
            ]
        if "authz" in only:
            print("authz HTTP port exhaustion...", flush=True)
            results["authz_exhaustion"] = _timed(authz_exhaustion, work / "authz")
        if "names" in only:
            print("huge requests of tiny names...", flush=True)
            results["huge_names"] = _timed(huge_names, work / "names")
    results["seconds"] = round(time.monotonic() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
