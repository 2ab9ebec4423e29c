"""xDS load generator: many sidecar-like ADS streams, in processes of their own.

Each stream has its own HTTP/2 connection (its own TCP connection), identifies its node (with a
token), subscribes like an Envoy sidecar does — CDS and LDS wildcard, then EDS for the EDS clusters
it received and RDS for the route names its listeners carry, SDS for its own certificate and the
trust bundle — and ACKs every response. State of the world or delta.

Two kinds of client (``LoadGenerator(..., client=)``):
  h2    bench.h2grpc, a minimal gRPC client on the ``h2`` library: receive windows of 16 MiB, no
        pings of its own, so xdsd sees an ACK per response and little else. Cheap for this process
        (~90 ms of CPU per 1,000-stream fan-out), so it measures xdsd rather than the generator.
  grpc  grpc.aio channels (grpc-core, bench.grpcclient), one per stream: what proxyless gRPC and
        Envoy's google_grpc run, with grpc-core's HTTP/2 habits (BDP PINGs, WINDOW_UPDATEs as it
        reads, ...). It costs this process more (~190 ms of CPU per 1,000-stream fan-out), so
        bench.xds reports the generator's CPU beside xdsd's.
Workers may be pinned to CPUs (``cpus=``), so that xdsd keeps a core of its own.

The driver (bench.xds) talks to workers over a pipe:
    ("connect", specs)        open streams; answers per-stream seconds until CDS+EDS+LDS+RDS were ACKed
    ("since", t0, timeout)    answers, per stream, seconds from t0 to the ACK of the first EDS response after t0
    ("bytes",)                bytes received per type, summed over this worker's streams (then reset)
    ("close",)                close all streams and exit
Times are ``time.monotonic()``, which is one clock for every process on the machine. An ACK's time
is when it was handed to the client library (h2: the transport; grpc: the call's request queue),
right after the response was parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench.h2grpc import CANCELLED, H2GrpcError, H2Stream, open_stream

CLIENTS = ("h2", "grpc")

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
READY_TYPES = frozenset({CDS, EDS, LDS, RDS})
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class StreamSpec:
    node_id: str
    cluster: str
    token: str | None
    delta: bool
    secrets: tuple[str, ...] = ()  # SDS names to subscribe to
    # A loopback address to connect from (h2 client only): each proxy on its own machine, as in a
    # mesh of VMs; grpc.aio channels cannot choose theirs.
    source: str | None = None


@dataclass
class StreamState:
    spec: StreamSpec
    started: float = 0.0
    acked: dict[str, float] = field(default_factory=dict)  # type -> first ACK time
    ready_at: float | None = None
    eds_acks: list[float] = field(default_factory=list)  # ACK times of every EDS response
    waiter: _Since | None = None  # a ``since`` waiting for this stream's next EDS ACK
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error: str | None = None
    done: asyncio.Event | None = None  # set when ready or failed


class _Since:
    """One ``since`` call: counts the streams that have yet to ACK an EDS response after ``t0``.
    One future for all of them (a task and a timer per stream cost more than the stream itself)."""

    def __init__(self, t0: float, left: int) -> None:
        self.t0 = t0
        self.left = left
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def arrived(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


def _eds_names(resources: Any) -> list[str]:
    names = []
    for any_ in resources:
        c = cluster_pb2.Cluster.FromString(any_.value)
        if c.type == cluster_pb2.Cluster.EDS:
            names.append(c.name)
    return sorted(names)


def _rds_names(resources: Any) -> list[str]:
    names: set[str] = set()
    for any_ in resources:
        listener = listener_pb2.Listener.FromString(any_.value)
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if hcm.HasField("rds"):
                        names.add(hcm.rds.route_config_name)
    return sorted(names)


class _Sotw:
    method = ADS + "StreamAggregatedResources"

    def __init__(self, st: StreamState, call: H2Stream) -> None:
        self.st = st
        self.call = call
        self.first = True
        self.names: dict[str, list[str]] = {}

    def send(self, type_url: str, names: list[str], version: str = "", nonce: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, version_info=version,
                                             response_nonce=nonce)
        if self.first:
            self.first = False
            req.node.id = self.st.spec.node_id
            req.node.cluster = self.st.spec.cluster
        self.names[type_url] = names
        self.call.write(req.SerializeToString())

    async def run(self) -> None:
        self.send(CDS, [])
        self.send(LDS, [])
        if self.st.spec.secrets:
            self.send(SDS, list(self.st.spec.secrets))
        async for raw in self.call:
            resp = discovery_pb2.DiscoveryResponse.FromString(raw)
            t = resp.type_url
            self.st.bytes[t] += len(raw)
            follow: tuple[str, list[str]] | None = None
            if t == CDS:
                eds = _eds_names(resp.resources)
                if eds != self.names.get(EDS):
                    follow = (EDS, eds)
            elif t == LDS:
                rds = _rds_names(resp.resources)
                if rds != self.names.get(RDS):
                    follow = (RDS, rds)
            self.send(t, self.names.get(t, []), resp.version_info, resp.nonce)  # ACK
            _acked(self.st, t)
            if follow is not None:
                self.send(*follow)


class _Delta:
    method = ADS + "DeltaAggregatedResources"

    def __init__(self, st: StreamState, call: H2Stream) -> None:
        self.st = st
        self.call = call
        self.first = True
        self.names: dict[str, set[str]] = defaultdict(set)
        self.held: dict[str, set[str]] = defaultdict(set)

    def send(self, type_url: str, subscribe: list[str] = [], unsubscribe: list[str] = [],  # noqa: B006
             nonce: str = "") -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=subscribe,
                                                  resource_names_unsubscribe=unsubscribe, response_nonce=nonce)
        if self.first:
            self.first = False
            req.node.id = self.st.spec.node_id
            req.node.cluster = self.st.spec.cluster
        self.call.write(req.SerializeToString())

    def _follow(self, type_url: str, wanted: set[str]) -> None:
        have = self.names[type_url]
        add, drop = sorted(wanted - have), sorted(have - wanted)
        self.names[type_url] = wanted
        if add or drop:
            self.send(type_url, add, drop)

    async def run(self) -> None:
        self.send(CDS)
        self.send(LDS)
        if self.st.spec.secrets:
            self.send(SDS, list(self.st.spec.secrets))
        async for raw in self.call:
            resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
            t = resp.type_url
            self.st.bytes[t] += len(raw)
            held = self.held[t]
            held.difference_update(resp.removed_resources)
            self.send(t, nonce=resp.nonce)  # ACK
            _acked(self.st, t)
            if t == CDS:
                eds = set(_eds_names([r.resource for r in resp.resources]))
                changed = {r.name for r in resp.resources}
                # Keep EDS subscriptions for clusters held and still EDS; a removal drops them.
                keep = {n for n in self.names[EDS] if n in held and n not in changed} | eds
                held.update(changed)
                self._follow(EDS, keep - set(resp.removed_resources))
            elif t == LDS:
                held.update(r.name for r in resp.resources)
                rds = set(_rds_names([r.resource for r in resp.resources]))
                self._follow(RDS, self.names[RDS] | rds)
            else:
                held.update(r.name for r in resp.resources)


def _acked(st: StreamState, type_url: str) -> None:
    """Called right after the ACK was handed to the transport (``H2Stream.write`` is synchronous)."""
    now = time.monotonic()
    st.acked.setdefault(type_url, now)
    if st.ready_at is None and READY_TYPES <= st.acked.keys():
        st.ready_at = now
        if st.done is not None:
            st.done.set()
    if type_url == EDS:
        st.eds_acks.append(now)
        waiter = st.waiter
        if waiter is not None and now >= waiter.t0:
            st.waiter = None
            waiter.arrived()


class Worker:
    def __init__(self, target: str, client: str = "h2") -> None:
        self.target = target
        self.client = client
        self.streams: list[StreamState] = []
        self.tasks: list[asyncio.Task[None]] = []
        host, _, port = target.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)

    async def _run_stream(self, st: StreamState) -> None:
        metadata = (("x-xdsd-token", st.spec.token),) if st.spec.token else ()
        kind = _Delta if st.spec.delta else _Sotw
        call: Any = None
        try:
            # Its own TCP connection, like a separate Envoy.
            if self.client == "grpc":
                from bench.grpcclient import open_grpc_stream

                call = await open_grpc_stream(self.host, self.port, kind.method, metadata)
            else:
                call = await open_stream(self.host, self.port, kind.method, metadata, source=st.spec.source)
            await kind(st, call).run()
        except H2GrpcError as exc:
            if exc.code != CANCELLED:
                st.error = str(exc)
        except OSError as exc:
            st.error = f"UNAVAILABLE: cannot connect to {self.target}: {exc!r}"
        except asyncio.CancelledError:
            pass
        finally:
            if call is not None:
                call.close()
            if st.done is not None:
                st.done.set()

    async def connect(self, specs: list[StreamSpec], timeout: float) -> list[float | None]:
        t0 = time.monotonic()
        fresh = [StreamState(spec, started=t0, done=asyncio.Event()) for spec in specs]
        self.streams.extend(fresh)
        self.tasks.extend(asyncio.create_task(self._run_stream(st)) for st in fresh)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(st.done.wait() for st in fresh if st.done)), timeout)
        return [None if st.ready_at is None else st.ready_at - t0 for st in fresh]

    async def since(self, t0: float, timeout: float) -> list[float | None]:
        waiting = [st for st in self.streams if not any(t >= t0 for t in st.eds_acks)]
        if waiting:
            waiter = _Since(t0, len(waiting))
            for st in waiting:
                st.waiter = waiter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.done, timeout)
            for st in waiting:
                st.waiter = None
        out: list[float | None] = []
        for st in self.streams:
            after = [t for t in st.eds_acks if t >= t0]
            out.append(after[0] - t0 if after else None)
            st.eds_acks = after[-1:]
        return out

    def take_bytes(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for st in self.streams:
            for t, n in st.bytes.items():
                total[t] += n
            st.bytes.clear()
        return dict(total)

    def errors(self) -> list[str]:
        return [f"{st.spec.node_id}: {st.error}" for st in self.streams if st.error]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)  # each closes its connection


async def _serve(conn: Connection, target: str, client: str) -> None:
    worker = Worker(target, client)
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd[0]
        if op == "connect":
            conn.send((await worker.connect(cmd[1], cmd[2]), worker.errors()))
        elif op == "since":
            conn.send((await worker.since(cmd[1], cmd[2]), worker.errors()))
        elif op == "bytes":
            conn.send(worker.take_bytes())
        elif op == "close":
            await worker.close()
            conn.send(None)
            return


def raise_fd_limit() -> int:
    """Each stream is a connection: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _main(conn: Connection, target: str, client: str = "h2", cpus: frozenset[int] | None = None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)  # before any thread (grpc's) starts: they inherit it
    raise_fd_limit()
    if client == "grpc":  # grpc.aio runs on asyncio's own loop
        asyncio.run(_serve(conn, target, client))
        return
    try:
        import uvloop

        uvloop.run(_serve(conn, target, client))
    except ImportError:  # pragma: no cover
        asyncio.run(_serve(conn, target, client))


class LoadGenerator:
    """``processes`` workers of one ``client`` kind ("h2" or "grpc"), pinned to ``cpus`` if given;
    streams are dealt to them round robin."""

    def __init__(self, target: str, processes: int, client: str = "h2", cpus: frozenset[int] | None = None) -> None:
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}")
        ctx = mp.get_context("spawn")
        self.client = client
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_main, args=(child, target, client, cpus), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def _all(self, make: Any) -> list[Any]:
        for i, c in enumerate(self.conns):
            c.send(make(i))
        return [c.recv() for c in self.conns]

    def connect(self, specs: list[StreamSpec], timeout: float = 120.0) -> tuple[list[float | None], list[str]]:
        n = len(self.conns)
        answers = self._all(lambda i: ("connect", specs[i::n], timeout))
        return [x for a in answers for x in a[0]], [e for a in answers for e in a[1]]

    def since(self, t0: float, timeout: float = 30.0) -> tuple[list[float | None], list[str]]:
        answers = self._all(lambda i: ("since", t0, timeout))
        return [x for a in answers for x in a[0]], [e for a in answers for e in a[1]]

    def take_bytes(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for part in self._all(lambda i: ("bytes",)):
            for t, v in part.items():
                total[t] += v
        return dict(total)

    def cpu(self) -> float:
        """CPU seconds the workers have used (every thread, from /proc)."""
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._all(lambda i: ("close",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
