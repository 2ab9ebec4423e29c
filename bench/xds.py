"""xDS benchmarks against a real ``xdsd serve`` process (issues 8 and 19).

    .venv/bin/python -m bench.xds [--full] [--only SCENARIO ...] [--out bench/results/xds.json]

xdsd runs on one core (core 0) and everything else -- this driver, the load generator's workers,
Envoys, py-spy, the frame tap -- on the other (``--no-pin`` leaves scheduling to the kernel).

Scenarios (each reports p50/p99/max, xdsd's CPU seconds, the load generator's CPU seconds, peak RSS
and xdsd's longest event-loop stall):
  storm      for each client kind (h2: bench.h2grpc; grpc: grpc.aio channels, grpc-core) and N
             streams: a reconnect storm (time until each stream has CDS, EDS, LDS, RDS ACKed), then
             one-endpoint changes of both kinds -- a registration over the HTTP API, and an edit of
             the mesh file (written beside it and renamed into place) -- each fanned out to every
             stream (time until every stream has ACKed the new assignment; the clock starts before
             the request or the rename, so the debounce is included); idle RSS per stream
  gateway    (full) the same with every stream a gateway holding every cluster (issue 19's setup)
  idle       xdsd's CPU over a quiet window with no proxies, and with N idle streams of each kind
  large      one endpoint change in a 10,000-endpoint service, 200 subscribed streams
  meshfile   a one-endpoint edit of the mesh file as the mesh grows (100 and 1,000 services; --full:
             3,000): time until the sidecars calling the service have it, xdsd CPU per edit
  delta      bytes for a one-endpoint and a one-cluster change, delta vs state of the world,
             for a gateway that holds every cluster, as the mesh grows
  envoys     real Envoys (20; --full: 150): time from a change until every one routes to the new endpoint
  frames     (full) the HTTP/2 frames each client kind (and Envoy) exchanges with xdsd per change, at
             connect and while idle, through bench.h2tap
  profile    (full) py-spy samples of xdsd during fan-outs to 1,000 streams of each kind and while
             1,000 streams idle; cProfile call counts per pushed stream (bench.inproc)
  soak       (full) bench.soak: registrations and heartbeats at a steady rate with streams connected
Streams come from bench.loadgen worker processes (their own HTTP/2 connection each); half the
streams speak state of the world, half delta. Tokens are real (``--auth required``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import resource
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import meshgen
from bench.envoys import FastUpstreams, Fleet, envoy_pids, gateway_envoys, gateway_mesh
from bench.h2tap import FrameTap, per
from bench.loadgen import CDS, CLIENTS, EDS, LoadGenerator, StreamSpec
from bench.profiling import PySpy, pin, split_cpus
from tests.support.procs import free_port
from tests.support.xdsd_proc import XdsdProcess
from xdsd.generators.tls import bundle_secret_name

ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")
CHANGES = ("registration", "file")
# xdsd's CPUs and everyone else's (set by main(); None: not pinned).
XDSD_CPUS: frozenset[int] | None = None
OTHER_CPUS: frozenset[int] | None = None


# -- measuring the xdsd process ----------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of a process, from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def self_cpu() -> float:
    """This process's CPU seconds (the driver: HTTP calls, file writes, Envoy pollers)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Probe:
    """CPU seconds, RSS and peak RSS of a process, from /proc; the peak can be reset per scenario."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass


class Target:
    """``xdsd serve`` on free ports with a generated mesh, plus the measurements around it.

    ``cpus``: pin xdsd (every thread) there once it runs. ``instruments``: run it under
    bench.inproc with these flags (tracemalloc, cProfile), snapshots in ``workdir/inproc``."""

    def __init__(self, mesh: dict[str, Any], workdir: Path, cpus: frozenset[int] | None = None,
                 instruments: list[str] | None = None, extra_args: list[str] | None = None) -> None:
        self.mesh = mesh
        path = workdir / "mesh.yaml"
        path.write_text(yaml.safe_dump(mesh, sort_keys=False))
        self.path = path
        self.cpus = cpus
        # Plaintext on loopback: the load generator's streams speak h2c (TLS would measure the handshakes).
        self.xdsd = XdsdProcess(path, workdir, log_level="warning",
                                extra_args=["--drain-time", "0.2", "--xds-plaintext", *(extra_args or [])])
        self.snapshots = workdir / "inproc"
        if instruments is not None:
            cmd = self.xdsd.proc.cmd
            assert cmd[1:3] == ["-m", "xdsd"], cmd
            self.xdsd.proc.cmd = [cmd[0], "-m", "bench.inproc", "--snapshots", str(self.snapshots), *instruments,
                                  *cmd[3:]]
        self.trust_domain = mesh.get("mesh", {}).get("trust_domain", "mesh.local")
        self.changes = 0  # endpoints added so far (each change adds a new one)

    def __enter__(self) -> Target:
        self.xdsd.start(timeout=300)
        pid = self.xdsd.proc.pid
        assert pid is not None
        self.probe = Probe(pid)
        pin(pid, self.cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        self.xdsd.stop()

    @property
    def pid(self) -> int:
        return self.probe.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.xdsd.xds_port}"

    def loop_stall(self) -> float:
        """Longest event-loop stall (seconds) since the last call."""
        got = self.xdsd.admin_get_json("/debug/loop?reset=1")
        self.last_gc = float(got.get("max_gc_seconds", 0.0))
        return float(got["max_stall_seconds"])

    def metric_sum_count(self, name: str) -> tuple[float, float]:
        total = count = 0.0
        for line in self.xdsd.admin_get("/metrics").splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.split()[-1])
            elif line.startswith(name + "_count"):
                count += float(line.split()[-1])
        return total, count

    def post(self, path: str, body: dict[str, Any], service: str) -> dict[str, Any]:
        req = urllib.request.Request(
            self.xdsd.admin_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"content-type": "application/json", "x-xdsd-token": self.xdsd.token(f"bench-{service}", service)},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def register(self, service: str, address: str, port: int, instance_id: str) -> None:
        self.post("/v1/register", {"service": service, "address": address, "port": port,
                                   "instance_id": instance_id, "ttl": "600s"}, service)

    def deregister(self, service: str, instance_id: str) -> None:
        self.post("/v1/deregister", {"service": service, "instance_id": instance_id}, service)

    def write_mesh(self) -> float:
        """The mesh file replaced atomically: written beside it, then renamed into place. Returns
        the moment of the rename (what xdsd can see first; the driver's own YAML dump before it,
        ~0.1 s for this mesh in pure Python, is not xdsd's time)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.mesh, sort_keys=False))
        renamed = time.monotonic()
        os.replace(tmp, self.path)
        return renamed

    def change(self, kind: str, service: str) -> float:
        """One new endpoint of ``service``: registered (``registration``) or added to the mesh file
        (``file``). Returns when the change began: before the request, or at the rename."""
        k = self.changes
        self.changes += 1
        address = f"10.{200 + k // 62500 % 50}.{k // 250 % 250}.{k % 250 + 1}"
        if kind == "registration":
            started = time.monotonic()
            self.register(service, address, meshgen.INBOUND_PORT, f"bench-{k}")
            return started
        if kind == "file":
            self.mesh["services"][service].setdefault("endpoints", []).append(
                {"address": address, "port": meshgen.INBOUND_PORT})
            return self.write_mesh()
        raise ValueError(kind)

    def specs(self, n: int, clusters: list[str], delta_share: float = 0.5, tag: str = "") -> list[StreamSpec]:
        out = []
        signer_state = self.xdsd  # tokens are minted with xdsd's own key, from its state dir
        bundle = bundle_secret_name(self.trust_domain)
        for i in range(n):
            cluster = clusters[i % len(clusters)]
            node_id = f"bench{tag}-{i}"
            delta = int((i + 1) * delta_share) > int(i * delta_share)  # spread evenly
            own = f"spiffe://{self.trust_domain}/service/{cluster}"
            # Each proxy from its own loopback address (127.1.0.0 on), as proxies on their own VMs.
            source = f"127.{1 + (i >> 16) % 254}.{(i >> 8) & 255}.{i & 255}"
            out.append(StreamSpec(node_id, cluster, signer_state.token(node_id, cluster), delta, (own, bundle),
                                  source))
        return out


def summary(values: list[float | None], scale: float = 1000.0) -> dict[str, Any]:
    """p50/p99/max in milliseconds (``scale``) over the values that arrived; ``missing`` counts the rest."""
    got = sorted(v * scale for v in values if v is not None)
    if not got:
        return {"n": 0, "missing": len(values)}

    def pct(p: float) -> float:
        return got[min(len(got) - 1, int(round(p / 100 * (len(got) - 1))))]

    return {"n": len(got), "missing": len(values) - len(got), "p50": pct(50), "p99": pct(99), "max": got[-1],
            "mean": statistics.fmean(got)}


def _processes(n: int) -> int:
    return max(1, min(4, (n + 999) // 1000))


def _mean_ms(t: Target, histogram: str) -> float:
    total, count = t.metric_sum_count(histogram)
    return total / count * 1000 if count else 0.0


# -- scenarios ------------------------------------------------------------------------------


def fleet_mesh(role: str) -> tuple[dict[str, Any], list[str]]:
    """100 services x 10 endpoints; the node clusters the streams take (sidecars that call the hot
    service, or one gateway ``edge`` that routes to every service and so holds every cluster)."""
    mesh = meshgen.mesh(100, 10, upstreams=5)
    if role == "gateway":
        mesh["gateways"] = {"edge": {"listen": {"address": "127.0.0.1", "port": free_port()},
                                     "routes": [{"prefix": f"/{n}", "service": n} for n in mesh["services"]]}}
        return mesh, ["edge"]
    return mesh, meshgen.client_services(mesh)


def fanout(t: Target, lg: LoadGenerator, kind: str, changes: int, n: int, settle: float = 0.3) -> dict[str, Any]:
    """``changes`` one-endpoint changes of ``kind`` to the hot service, each waited for on every
    stream; CPU of xdsd and of the load generator per change (``settle`` s after each change is
    counted too: xdsd handles the last ACKs after the clients sent them)."""
    hot = meshgen.service_name(0)
    t.loop_stall()
    t.probe.reset_peak()
    build0 = t.metric_sum_count("xdsd_snapshot_build_seconds")
    cpu0, gen0 = t.probe.cpu(), lg.cpu()
    lat: list[float | None] = []
    errors: list[str] = []
    for _ in range(changes):
        t0 = t.change(kind, hot)
        got, errs = lg.since(t0, timeout=60)
        lat.extend(got)
        errors += errs
        time.sleep(settle)
    cpu, gen = (t.probe.cpu() - cpu0) / changes, (lg.cpu() - gen0) / changes
    build1 = t.metric_sum_count("xdsd_snapshot_build_seconds")
    return {**summary(lat), "changes": changes, "cpu_s_per_change": cpu, "gen_cpu_s_per_change": gen,
            "cpu_ms_per_stream": cpu * 1000 / n, "peak_rss_mb": t.probe.peak() / 2**20,
            "loop_stall_ms": t.loop_stall() * 1000,
            "build_ms": (build1[0] - build0[0]) / max(1.0, build1[1] - build0[1]) * 1000,
            "errors": sorted(set(errors))[:5]}


def fleet(n: int, client: str, workdir: Path, changes: int = 5, role: str = "sidecar",
          kinds: tuple[str, ...] = CHANGES) -> dict[str, Any]:
    """Reconnect storm of ``n`` streams of one client kind, then ``changes`` one-endpoint changes of
    each kind fanned out to all of them."""
    mesh, clusters = fleet_mesh(role)
    # grpc.aio channels all connect from 127.0.0.1, like proxies behind one NAT address: xdsd is
    # told to expect that many at once, as its operator would (h2 streams each have their own address).
    extra = ["--max-unauthenticated-per-source", str(n)] if client == "grpc" and n > 1024 else []
    with Target(mesh, workdir, XDSD_CPUS, extra_args=extra) as t, \
            LoadGenerator(t.target, _processes(n), client, OTHER_CPUS) as lg:
        specs = t.specs(n, clusters)
        time.sleep(0.5)
        t.loop_stall()
        rss0, cpu0, gen0 = t.probe.rss(), t.probe.cpu(), lg.cpu()
        t.probe.reset_peak()
        ready, errors = lg.connect(specs, timeout=300)
        storm = {**summary(ready), "cpu_s": t.probe.cpu() - cpu0, "gen_cpu_s": lg.cpu() - gen0,
                 "peak_rss_mb": t.probe.peak() / 2**20, "loop_stall_ms": t.loop_stall() * 1000,
                 "errors": errors[:5]}
        time.sleep(1.0)  # settle: idle streams
        rss1 = t.probe.rss()
        memory = {"streams": n, "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
                  "per_stream_kib": (rss1 - rss0) / n / 1024}
        out = {"n": n, "client": client, "role": role, "storm": storm, "memory": memory, "fanout": {}}
        for kind in kinds:
            out["fanout"][kind] = fanout(t, lg, kind, changes, n)
    return out


def idle(workdir: Path, seconds: float = 10.0, streams: int = 1000, spy: bool = False) -> dict[str, Any]:
    """xdsd's CPU over ``seconds`` of quiet: with no proxies; with ``streams`` idle streams of each
    client kind (and the generator's CPU meanwhile); and with none again after they left."""
    mesh, clusters = fleet_mesh("sidecar")
    out: dict[str, Any] = {"seconds": seconds, "streams": streams}
    with Target(mesh, workdir, XDSD_CPUS) as t:
        time.sleep(3.0)  # start-up work done

        def window(key: str, lg: LoadGenerator | None = None) -> None:
            c0, g0 = t.probe.cpu(), lg.cpu() if lg else 0.0
            profile = None
            if spy and PySpy.available():
                profile = PySpy(t.pid, workdir / f"idle-{key}.txt", rate=100)
            time.sleep(seconds)
            if profile is not None:
                profile.stop()
            row = {"cpu_s": t.probe.cpu() - c0, "per_10s": (t.probe.cpu() - c0) * 10 / seconds}
            if lg is not None:
                row["gen_cpu_s"] = lg.cpu() - g0
            if profile is not None:
                row["profile"] = profile.summary(12)
            out[key] = row

        window("no_proxies")
        for client in CLIENTS:
            with LoadGenerator(t.target, _processes(streams), client, OTHER_CPUS) as lg:
                ready, errors = lg.connect(t.specs(streams, clusters, tag=f"-idle-{client}"), timeout=300)
                out[f"connected_{client}"] = sum(r is not None for r in ready)
                time.sleep(3.0)
                window(f"streams_{client}", lg)
            time.sleep(2.0)
        window("no_proxies_after")
    return out


def mesh_file(workdir: Path, sizes: list[int], changes: int = 5, streams: int = 10) -> list[dict[str, Any]]:
    """A one-endpoint edit of the mesh file (written beside it, renamed into place) as the mesh
    grows (N services x 10 endpoints): the time until ``streams`` sidecars calling the edited
    service have ACKed it (the debounce included) and xdsd's CPU per edit. Before incremental
    reading, each edit parsed and validated the whole file."""
    rows = []
    for n in sizes:
        mesh = meshgen.mesh(n, 10, upstreams=5)
        hot = meshgen.service_name(0)
        d = workdir / str(n)
        d.mkdir()
        print(f"  {n} services...", flush=True)
        with Target(mesh, d, XDSD_CPUS) as t, LoadGenerator(t.target, 1, "h2", OTHER_CPUS) as lg:
            ready, errors = lg.connect(t.specs(streams, meshgen.client_services(mesh)), timeout=300)
            time.sleep(1.0)
            latencies: list[float | None] = []
            cpu = []
            for _ in range(changes):
                c0 = t.probe.cpu()
                started = t.change("file", hot)
                got, errs = lg.since(started, timeout=60)
                latencies.append(max((v for v in got if v is not None), default=None))
                errors += errs
                time.sleep(0.3)  # what follows the revision (history, status) counts too
                cpu.append(t.probe.cpu() - c0)
            rows.append({"services": n, "bytes": t.path.stat().st_size, **summary(latencies),
                         "cpu_s_per_edit": statistics.fmean(cpu), "cpu_s_max": max(cpu), "errors": errors[:3]})
    return rows


def large_cluster(workdir: Path, endpoints: int = 10_000, streams: int = 200, changes: int = 5) -> dict[str, Any]:
    mesh = meshgen.mesh(1, endpoints, upstreams=1)
    hot = meshgen.service_name(0)
    with Target(mesh, workdir, XDSD_CPUS) as t, LoadGenerator(t.target, 1, "h2", OTHER_CPUS) as lg:
        ready, errors = lg.connect(t.specs(streams, ["client"]), timeout=300)
        time.sleep(0.5)
        t.loop_stall()
        before = t.metric_sum_count("xdsd_snapshot_build_seconds")
        lg.take_bytes()
        cpu0, gen0 = t.probe.cpu(), lg.cpu()
        t.probe.reset_peak()
        lat: list[float | None] = []
        for _ in range(changes):
            t0 = time.monotonic()
            t.change("registration", hot)
            got, errs = lg.since(t0, timeout=60)
            lat.extend(got)
            errors += errs
        after = t.metric_sum_count("xdsd_snapshot_build_seconds")
        eds_bytes = lg.take_bytes().get(EDS, 0)
        return {
            "endpoints": endpoints, "streams": streams, "connected": sum(r is not None for r in ready),
            **summary(lat), "changes": changes,
            "build_ms": (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1000,
            "cpu_s_per_change": (t.probe.cpu() - cpu0) / changes, "gen_cpu_s_per_change": (lg.cpu() - gen0) / changes,
            "peak_rss_mb": t.probe.peak() / 2**20,
            "loop_stall_ms": t.loop_stall() * 1000, "eds_bytes_per_stream_per_change": eds_bytes / streams / changes,
            "errors": errors[:5],
        }


def delta_efficiency(workdir: Path, sizes: list[int], changes: int = 20) -> list[dict[str, Any]]:
    """A gateway that routes to every service (so it holds every cluster); one SotW and one delta
    stream, each from its own worker. One-endpoint change (registration) and one-cluster change
    (a file edit: CDS is a full-state type, so state of the world resends every cluster).
    ``changes`` endpoint changes: xdsd's CPU time comes from /proc in 10 ms ticks, and one change
    costs about a millisecond, so a few changes would measure the tick, not the change."""
    out = []
    for size in sizes:
        mesh = meshgen.mesh(size, 1, upstreams=1)
        mesh["gateways"] = {"edge": {"listen": {"address": "127.0.0.1", "port": free_port()},
                                     "routes": [{"prefix": f"/{n}", "service": n} for n in mesh["services"]]}}
        hot = meshgen.service_name(0)
        sub = workdir / f"delta-{size}"
        sub.mkdir()
        with Target(mesh, sub, XDSD_CPUS) as t, LoadGenerator(t.target, 1, "h2", OTHER_CPUS) as sotw, \
                LoadGenerator(t.target, 1, "h2", OTHER_CPUS) as delta:
            _, errors = sotw.connect(t.specs(1, ["edge"], delta_share=0.0, tag="-sotw"), timeout=300)
            errors += delta.connect(t.specs(1, ["edge"], delta_share=1.0, tag="-delta"), timeout=300)[1]
            time.sleep(0.5)
            sotw.take_bytes()
            delta.take_bytes()
            cpu: list[float] = []
            build0 = t.metric_sum_count("xdsd_snapshot_build_seconds")
            endpoint_change: dict[str, float] = {}
            for k in range(changes):
                c0 = t.probe.cpu()
                t0 = time.monotonic()
                t.change("registration", hot)
                sotw.since(t0, timeout=60)
                delta.since(t0, timeout=60)
                cpu.append(t.probe.cpu() - c0)
                if k == 2:  # bytes of the first three (the assignment grows by one endpoint a change)
                    endpoint_change = {"sotw": sum(sotw.take_bytes().values()) / 3,
                                       "delta": sum(delta.take_bytes().values()) / 3}
            build1 = t.metric_sum_count("xdsd_snapshot_build_seconds")
            sotw.take_bytes()
            delta.take_bytes()
            t.mesh["services"][hot]["connect_timeout"] = "2s"
            t.write_mesh()
            cluster_change = {"sotw": _wait_bytes(sotw, CDS), "delta": _wait_bytes(delta, CDS)}
            out.append({
                "clusters": size,
                "endpoint_change_bytes": endpoint_change,
                "cluster_change_bytes": cluster_change,
                "cpu_ms_per_endpoint_change": statistics.fmean(cpu) * 1000,
                "build_ms": (build1[0] - build0[0]) / max(1.0, build1[1] - build0[1]) * 1000,
                "errors": errors[:5],
            })
    return out


def _wait_bytes(lg: LoadGenerator, type_url: str, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    total = 0.0
    while time.monotonic() < deadline:
        got = lg.take_bytes()
        total += sum(got.values())
        if got.get(type_url):
            time.sleep(0.3)
            return total + sum(lg.take_bytes().values())
        time.sleep(0.05)
    return total


def real_envoys(workdir: Path, count: int = 20, changes: int = 5, kinds: tuple[str, ...] = CHANGES) -> dict[str, Any]:
    """``count`` Envoys (gateways ``--concurrency 1``, each its own listener and node group) route
    to service ``target``; each change moves ``target`` to the other instance -- by registering
    the new one and deregistering the old, or by rewriting its endpoints in the mesh file -- and
    every Envoy is polled until it answers from the new one."""
    ports = [free_port() for _ in range(count)]
    ups = FastUpstreams({"blue": "127.0.0.2", "green": "127.0.0.3"})
    out: dict[str, Any] = {"envoys": count}
    try:
        with Target(gateway_mesh(ports), workdir, XDSD_CPUS) as t:
            host, port = ups.address("blue")
            t.register("target", host, port, "blue")
            started = time.monotonic()
            with gateway_envoys(count, t.xdsd.xds_port, t.xdsd.token, workdir):
                out["start_s"] = time.monotonic() - started
                fleet = Fleet(ports)
                state = {"current": "blue"}

                async def run() -> None:
                    try:
                        await fleet.until_all("blue", 300.0)
                        for kind in kinds:
                            out[kind] = await _envoy_changes(t, fleet, ups, kind, changes, state, count)
                    finally:
                        fleet.close()

                asyncio.run(run())
    finally:
        ups.stop()
    return out


async def _envoy_changes(t: Target, fleet: Fleet, ups: FastUpstreams, kind: str, changes: int,
                         state: dict[str, Any], count: int) -> dict[str, Any]:
    """``changes`` moves of ``target`` by ``kind``; the first file change (untimed) first moves the
    registered instance into the mesh file."""
    if kind == "file" and not t.mesh["services"]["target"].get("endpoints"):
        host, port = ups.address(state["current"])
        t.mesh["services"]["target"]["endpoints"] = [{"address": host, "port": port}]
        t.write_mesh()
        await asyncio.sleep(1.0)
        t.deregister("target", state["current"])
        await asyncio.sleep(1.0)
    t.loop_stall()
    envoys = envoy_pids()
    cpu0, drv0 = t.probe.cpu(), self_cpu()
    env0 = sum(proc_cpu(p) for p in envoys) + proc_cpu(ups.pid or 0)
    lat: list[float | None] = []
    rounds: list[float] = []
    for _ in range(changes):
        current = state["current"]
        new = "green" if current == "blue" else "blue"
        host, port = ups.address(new)
        t0 = time.monotonic()
        if kind == "registration":
            t.register("target", host, port, new)
            t.deregister("target", current)
        else:
            t.mesh["services"]["target"]["endpoints"] = [{"address": host, "port": port}]
            t0 = t.write_mesh()
        lat.extend(await fleet.until_all(new, 60.0, t0))
        rounds.append(fleet.round_ms)
        state["current"] = new
        await asyncio.sleep(0.5)  # the drained instance is gone (drain time 0.2 s)
    env = sum(proc_cpu(p) for p in envoys) + proc_cpu(ups.pid or 0) - env0
    cpu = (t.probe.cpu() - cpu0) / changes
    return {**summary(lat), "changes": changes, "cpu_s_per_change": cpu, "cpu_ms_per_envoy": cpu * 1000 / count,
            "poller_cpu_s_per_change": (self_cpu() - drv0) / changes, "envoys_cpu_s_per_change": env / changes,
            "loop_stall_ms": t.loop_stall() * 1000, "round_ms": statistics.fmean(rounds) if rounds else None}


def frames(workdir: Path, streams: int = 50, changes: int = 5, idle_seconds: float = 10.0,
           envoys: int = 5) -> dict[str, Any]:
    """The HTTP/2 frames exchanged with xdsd, through bench.h2tap: per stream at connect, per stream
    per change (each kind), per stream per minute idle; for each client kind and for real Envoys."""
    mesh, clusters = fleet_mesh("sidecar")
    out: dict[str, Any] = {"streams": streams, "changes": changes, "idle_seconds": idle_seconds}
    hot = meshgen.service_name(0)
    with Target(mesh, workdir, XDSD_CPUS) as t:
        for client in CLIENTS:
            row: dict[str, Any] = {}
            with FrameTap(t.xdsd.xds_port, cpus=OTHER_CPUS) as tap, \
                    LoadGenerator(tap.target, 1, client, OTHER_CPUS) as lg:
                ready, errors = lg.connect(t.specs(streams, clusters, tag=f"-frames-{client}"), timeout=120)
                time.sleep(1.0)
                got = tap.take()
                row["connect"] = per(got["counts"], streams)
                row["examples"] = got["examples"]
                for kind in CHANGES:
                    for _ in range(changes):
                        t0 = t.change(kind, hot)
                        lg.since(t0, timeout=60)
                        time.sleep(0.3)
                    row[kind] = per(tap.take()["counts"], streams * changes)
                time.sleep(idle_seconds)
                row["idle_per_minute"] = per(tap.take()["counts"], streams * idle_seconds / 60)
                row["errors"] = errors[:5]
            out[client] = row
    if envoys:
        out["envoy"] = _envoy_frames(workdir / "envoy-frames", envoys, changes)
    return out


def _envoy_frames(workdir: Path, count: int, changes: int) -> dict[str, Any]:
    workdir.mkdir(exist_ok=True)
    ports = [free_port() for _ in range(count)]
    ups = FastUpstreams({"blue": "127.0.0.2", "green": "127.0.0.3"})
    row: dict[str, Any] = {"envoys": count}
    try:
        with Target(gateway_mesh(ports), workdir, XDSD_CPUS) as t, FrameTap(t.xdsd.xds_port, cpus=OTHER_CPUS) as tap:
            host, port = ups.address("blue")
            t.register("target", host, port, "blue")
            with gateway_envoys(count, tap.port, t.xdsd.token, workdir):
                fleet = Fleet(ports)
                state = {"current": "blue"}

                async def run() -> None:
                    try:
                        await fleet.until_all("blue", 120.0)
                        await asyncio.sleep(1.0)
                        got = tap.take()
                        row["connect"] = per(got["counts"], count)
                        row["examples"] = got["examples"]
                        await _envoy_changes(t, fleet, ups, "registration", changes, state, count)
                        row["registration"] = per(tap.take()["counts"], count * changes)
                        await asyncio.sleep(10.0)
                        row["idle_per_minute"] = per(tap.take()["counts"], count * 10.0 / 60)
                    finally:
                        fleet.close()

                asyncio.run(run())
    finally:
        ups.stop()
    return row


def profile(workdir: Path, streams: int = 1000, changes: int = 10, rate: int = 250) -> dict[str, Any]:
    """py-spy over xdsd while ``changes`` changes of each kind fan out to ``streams`` streams of each
    client kind, and while they idle (10 s); then cProfile call counts per pushed stream (bench.inproc)."""
    out: dict[str, Any] = {"streams": streams, "changes": changes, "rate": rate}
    if not PySpy.available():
        return {"skipped": "py-spy is not installed"}
    mesh, clusters = fleet_mesh("sidecar")
    hot = meshgen.service_name(0)
    for client in CLIENTS:
        sub = workdir / f"profile-{client}"
        sub.mkdir()
        row: dict[str, Any] = {}
        with Target(mesh, sub, XDSD_CPUS) as t, \
                LoadGenerator(t.target, _processes(streams), client, OTHER_CPUS) as lg:
            lg.connect(t.specs(streams, clusters), timeout=300)
            time.sleep(1.0)
            for kind in CHANGES:
                cpu0, gen0 = t.probe.cpu(), lg.cpu()
                with PySpy(t.pid, sub / f"fanout-{kind}.txt", rate=rate) as spy:
                    for _ in range(changes):
                        t0 = t.change(kind, hot)
                        lg.since(t0, timeout=60)
                        time.sleep(0.3)
                row[kind] = {"cpu_s_per_change": (t.probe.cpu() - cpu0) / changes,
                             "gen_cpu_s_per_change": (lg.cpu() - gen0) / changes, **spy.summary(30)}
            time.sleep(1.0)
            c0 = t.probe.cpu()
            with PySpy(t.pid, sub / "idle.txt", rate=rate) as spy:
                time.sleep(10.0)
            row["idle"] = {"cpu_s": t.probe.cpu() - c0, **spy.summary(15)}
        row["counts"] = call_counts(sub, client, streams, changes)
        out[client] = row
    return out


# Functions whose call counts per pushed stream tell what a client makes xdsd do (bench.inproc).
COUNTED = ("data_received", "_consume", "_process", "receive_data", "_receive_frame", "_receive_ping_frame",
           "_receive_window_update_frame", "_receive_settings_frame", "_receive_data_frame", "write_out",
           "data_to_send", "refill", "grant", "feed", "flush", "send_data", "increment_flow_control_window",
           "read", "write", "_handle_ack", "_on_request", "ping_acknowledged", "acknowledge_received_data")


def call_counts(workdir: Path, client: str, streams: int, changes: int) -> dict[str, Any]:
    """xdsd run in-process under cProfile (bench.inproc) over ``changes`` registrations fanned out to
    ``streams`` streams of ``client``: calls per pushed stream of the transport's functions, and the
    functions with the most own time. cProfile slows everything down: the counts matter, not the times."""
    mesh, clusters = fleet_mesh("sidecar")
    hot = meshgen.service_name(0)
    sub = workdir / "cprofile"
    sub.mkdir()
    with Target(mesh, sub, XDSD_CPUS, instruments=["--cprofile"]) as t, \
            LoadGenerator(t.target, _processes(streams), client, OTHER_CPUS) as lg:
        lg.connect(t.specs(streams, clusters), timeout=300)
        time.sleep(1.0)
        os.kill(t.pid, signal.SIGUSR2)
        time.sleep(0.2)
        for _ in range(changes):
            t0 = time.monotonic()
            t.change("registration", hot)
            lg.since(t0, timeout=60)
            time.sleep(0.3)
        os.kill(t.pid, signal.SIGUSR2)
        t.xdsd.wait_for(lambda: (t.snapshots / "cprofile.done").exists(), "cProfile stats", 60)
    stats = pstats.Stats(str(t.snapshots / "cprofile.pstats"))
    pushed = streams * changes
    counts: dict[str, float] = {}
    own: list[tuple[float, str, int]] = []
    for (path, line, name), (_cc, ncalls, tottime, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = "/".join(Path(path).parts[-2:])
        if name in COUNTED and ("xdsd/transport" in path or "/h2/" in path or "xdsd/server" in path):
            key = f"{name} ({where})"
            counts[key] = counts.get(key, 0) + ncalls / pushed
        own.append((tottime, f"{name} ({where}:{line})", ncalls))
    own.sort(reverse=True)
    total = sum(x[0] for x in own) or 1.0
    return {"per_pushed_stream": {k: round(v, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])},
            "own_time_top": [(name, round(100 * tt / total, 1), round(n / pushed, 2)) for tt, name, n in own[:30]]}


# -- driver -----------------------------------------------------------------------------------


SCENARIOS = ("storm", "idle", "large", "meshfile", "delta", "envoys", "gateway", "frames", "profile", "soak")
QUICK = ("storm", "idle", "large", "meshfile", "delta", "envoys")


def main(argv: list[str] | None = None) -> None:
    global XDSD_CPUS, OTHER_CPUS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="bigger N (5,000 streams; 10k clusters; 150 Envoys) and "
                                                        "the gateway, frames, profile and soak scenarios")
    p.add_argument("--only", action="append", choices=SCENARIOS, help="run only these scenarios")
    p.add_argument("--envoys", type=int, default=None, help="real Envoys (default 20; --full: 150)")
    p.add_argument("--soak-minutes", type=float, default=7.0)
    p.add_argument("--no-pin", action="store_true", help="do not pin xdsd to core 0 and the rest to the others")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/xds.json (quick) or xds-full.json (--full)")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = ROOT / ("bench/results/xds-full.json" if a.full else "bench/results/xds.json")
    only = set(a.only or (SCENARIOS if a.full else QUICK))
    if not a.no_pin:
        XDSD_CPUS, OTHER_CPUS = split_cpus()
        if OTHER_CPUS:
            os.sched_setaffinity(0, OTHER_CPUS)  # this driver and everything it starts; xdsd is moved
    results: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() and a.only else {}
    results.pop("fleet", None)  # the layout before issue 19 (one client kind, registrations only)
    results["mode"] = "full" if a.full else "quick"
    results["pinned"] = None if XDSD_CPUS is None else {"xdsd": sorted(XDSD_CPUS), "others": sorted(OTHER_CPUS or ())}
    started = time.monotonic()

    def step(name: str, run: Callable[[Path], Any]) -> None:
        if name not in only:
            return
        print(f"{name}...", flush=True)
        t0 = time.monotonic()
        sub = work / name
        sub.mkdir()
        results[name] = run(sub)
        results.setdefault("scenario_seconds", {})[name] = time.monotonic() - t0
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))  # a later failure keeps what was measured

    with tempfile.TemporaryDirectory(prefix="xdsd-bench-") as tmp:
        work = Path(tmp)

        def storm(sub: Path) -> list[dict[str, Any]]:
            rows = []
            for n in [100, 1000, 5000] if a.full else [100, 1000]:
                for client in CLIENTS:
                    d = sub / f"{n}-{client}"
                    d.mkdir()
                    print(f"  {n} {client} streams...", flush=True)
                    rows.append(fleet(n, client, d))
            return rows

        def gateway(sub: Path) -> list[dict[str, Any]]:
            rows = []
            for client in CLIENTS:
                d = sub / client
                d.mkdir()
                rows.append(fleet(1000, client, d, role="gateway"))
            return rows

        def soak(sub: Path) -> dict[str, Any]:
            from bench.soak import soak as run_soak

            return run_soak(sub, seconds=a.soak_minutes * 60, cpus=(XDSD_CPUS, OTHER_CPUS))

        step("storm", storm)
        step("gateway", gateway)
        step("idle", lambda sub: idle(sub, seconds=30.0 if a.full else 20.0, spy=a.full))  # /proc counts 10 ms ticks
        step("large", large_cluster)
        step("meshfile", lambda sub: mesh_file(sub, [100, 1000, 3000] if a.full else [100, 1000]))
        step("delta", lambda sub: delta_efficiency(sub, [1000, 10000] if a.full else [1000, 5000]))
        step("envoys", lambda sub: real_envoys(sub, a.envoys or (150 if a.full else 20)))
        step("frames", frames)
        step("profile", profile)
        step("soak", soak)
    # A run of some scenarios (--only) merged into earlier results: the whole is their sum.
    results["seconds"] = (sum(results.get("scenario_seconds", {}).values()) if a.only
                          else time.monotonic() - started)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("profile", "frames")}, indent=2)[:20000])


if __name__ == "__main__":
    sys.exit(main())
