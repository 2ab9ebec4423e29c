"""xDS benchmarks against a real ``xdsd serve`` process (issue 8).

    .venv/bin/python -m bench.xds [--full] [--out bench/results/xds.json]

Scenarios (each reports p50/p99/max, xdsd's CPU seconds, peak RSS and its longest event-loop stall):
  storm      N sidecar streams connect at once; time until each has CDS, EDS, LDS, RDS ACKed
  fanout     one endpoint registered; time until every stream has ACKed the new assignment
             (the registration debounce is included: the clock starts before the HTTP request)
  memory     RSS per idle connected stream
  large      one endpoint change in a 10,000-endpoint service, 200 subscribed streams
  delta      bytes for a one-endpoint and a one-cluster change, delta vs state of the world,
             for a gateway that holds every cluster, as the mesh grows
  envoys     20 real Envoys: time from a change until every one routes to the new endpoint
Streams come from bench.loadgen worker processes (their own HTTP/2 connection each); half the
streams speak state of the world, half delta. Tokens are real (``--auth required``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import meshgen
from bench.loadgen import CDS, EDS, LoadGenerator, StreamSpec
from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.bootstrap import BootstrapOptions, render
from xdsd.generators.tls import bundle_secret_name

ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


# -- measuring the xdsd process ----------------------------------------------------------


class Probe:
    """CPU seconds, RSS and peak RSS of a process, from /proc; the peak can be reset per scenario."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

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
    """``xdsd serve`` on free ports with a generated mesh, plus the measurements around it."""

    def __init__(self, mesh: dict[str, Any], workdir: Path) -> None:
        self.mesh = mesh
        path = workdir / "mesh.yaml"
        path.write_text(yaml.safe_dump(mesh, sort_keys=False))
        self.path = path
        # Plaintext on loopback: the load generator's streams speak h2c (TLS would measure the handshakes).
        self.xdsd = XdsdProcess(path, workdir, log_level="warning", extra_args=["--drain-time", "0.2", "--xds-plaintext"])
        self.trust_domain = mesh.get("mesh", {}).get("trust_domain", "mesh.local")

    def __enter__(self) -> Target:
        self.xdsd.start(timeout=300)
        pid = self.xdsd.proc.pid
        assert pid is not None
        self.probe = Probe(pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.xdsd.stop()

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

    def specs(self, n: int, clusters: list[str], delta_share: float = 0.5, tag: str = "") -> list[StreamSpec]:
        out = []
        signer_state = self.xdsd  # tokens are minted with xdsd's own key, from its state dir
        bundle = bundle_secret_name(self.trust_domain)
        for i in range(n):
            cluster = clusters[i % len(clusters)]
            node_id = f"bench{tag}-{i}"
            delta = int((i + 1) * delta_share) > int(i * delta_share)  # spread evenly
            own = f"spiffe://{self.trust_domain}/service/{cluster}"
            out.append(StreamSpec(node_id, cluster, signer_state.token(node_id, cluster), delta, (own, bundle)))
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


# -- scenarios ------------------------------------------------------------------------------


def storm_fanout_memory(n: int, workdir: Path, changes: int = 5) -> dict[str, Any]:
    """Reconnect storm of ``n`` sidecars, then ``changes`` one-endpoint changes fanned out to all."""
    mesh = meshgen.mesh(100, 10, upstreams=5)
    clients = meshgen.client_services(mesh)
    hot = meshgen.service_name(0)
    with Target(mesh, workdir) as t, LoadGenerator(t.target, _processes(n)) as lg:
        specs = t.specs(n, clients)
        time.sleep(0.5)
        t.loop_stall()
        rss0, cpu0 = t.probe.rss(), t.probe.cpu()
        t.probe.reset_peak()
        ready, errors = lg.connect(specs, timeout=300)
        storm = {**summary(ready), "cpu_s": t.probe.cpu() - cpu0, "peak_rss_mb": t.probe.peak() / 2**20,
                 "loop_stall_ms": t.loop_stall() * 1000, "errors": errors[:5]}
        time.sleep(1.0)  # settle: idle streams
        rss1 = t.probe.rss()
        memory = {"streams": n, "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
                  "per_stream_kib": (rss1 - rss0) / n / 1024}
        lat: list[float | None] = []
        cpu1 = t.probe.cpu()
        t.probe.reset_peak()
        for k in range(changes):
            t0 = time.monotonic()
            t.register(hot, f"10.200.0.{k + 1}", meshgen.INBOUND_PORT, f"bench-{k}")
            got, errs = lg.since(t0, timeout=60)
            lat.extend(got)
            errors += errs
        fanout = {**summary(lat), "changes": changes, "cpu_s_per_change": (t.probe.cpu() - cpu1) / changes,
                  "peak_rss_mb": t.probe.peak() / 2**20, "loop_stall_ms": t.loop_stall() * 1000,
                  "build_ms": _mean_ms(t, "xdsd_snapshot_build_seconds")}
    return {"n": n, "storm": storm, "fanout": fanout, "memory": memory}


def _mean_ms(t: Target, histogram: str) -> float:
    total, count = t.metric_sum_count(histogram)
    return total / count * 1000 if count else 0.0


def large_cluster(workdir: Path, endpoints: int = 10_000, streams: int = 200, changes: int = 5) -> dict[str, Any]:
    mesh = meshgen.mesh(1, endpoints, upstreams=1)
    hot = meshgen.service_name(0)
    with Target(mesh, workdir) as t, LoadGenerator(t.target, 1) as lg:
        ready, errors = lg.connect(t.specs(streams, ["client"]), timeout=300)
        time.sleep(0.5)
        t.loop_stall()
        before = t.metric_sum_count("xdsd_snapshot_build_seconds")
        lg.take_bytes()
        cpu0 = t.probe.cpu()
        t.probe.reset_peak()
        lat: list[float | None] = []
        for k in range(changes):
            t0 = time.monotonic()
            t.register(hot, f"10.200.0.{k + 1}", meshgen.INBOUND_PORT, f"bench-{k}")
            got, errs = lg.since(t0, timeout=60)
            lat.extend(got)
            errors += errs
        after = t.metric_sum_count("xdsd_snapshot_build_seconds")
        eds_bytes = lg.take_bytes().get(EDS, 0)
        return {
            "endpoints": endpoints, "streams": streams, "connected": sum(r is not None for r in ready),
            **summary(lat), "changes": changes,
            "build_ms": (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1000,
            "cpu_s_per_change": (t.probe.cpu() - cpu0) / changes, "peak_rss_mb": t.probe.peak() / 2**20,
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
        with Target(mesh, sub) as t, LoadGenerator(t.target, 1) as sotw, LoadGenerator(t.target, 1) as delta:
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
                t.register(hot, f"10.200.0.{k + 1}", meshgen.INBOUND_PORT, f"bench-{k}")
                sotw.since(t0, timeout=60)
                delta.since(t0, timeout=60)
                cpu.append(t.probe.cpu() - c0)
                if k == 2:  # bytes of the first three (the assignment grows by one endpoint a change)
                    endpoint_change = {"sotw": sum(sotw.take_bytes().values()) / 3,
                                       "delta": sum(delta.take_bytes().values()) / 3}
            build1 = t.metric_sum_count("xdsd_snapshot_build_seconds")
            sotw.take_bytes()
            delta.take_bytes()
            mesh["services"][hot]["connect_timeout"] = "2s"
            t.path.write_text(yaml.safe_dump(mesh, sort_keys=False))
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


def real_envoys(workdir: Path, count: int = 20, changes: int = 5) -> dict[str, Any]:
    """``count`` Envoys (gateways, each on its own port) route to service ``target``; each change
    swaps the serving instance, and every Envoy is polled until it answers from the new one."""
    ports = [free_port() for _ in range(count)]
    ups = Upstreams({"blue": "127.0.0.2", "green": "127.0.0.3"}, workdir / "apps").start()
    mesh = {"services": {"target": {}},
            "gateways": {f"gw-{i:02d}": {"listen": {"address": "127.0.0.1", "port": p},
                                          "routes": [{"prefix": "/", "service": "target"}]}
                         for i, p in enumerate(ports)}}
    envoys: list[EnvoyProcess] = []
    (workdir / "envoys").mkdir(exist_ok=True)
    try:
        with Target(mesh, workdir) as t:
            host, port = ups.address("blue")
            t.register("target", host, port, "blue")
            for i in range(count):
                name = f"gw-{i:02d}"
                opts = BootstrapOptions(node_id=f"{name}-1", cluster=name, xds_host="127.0.0.1",
                                        xds_port=t.xdsd.xds_port, admin_port=free_port(),
                                        token=t.xdsd.token(f"{name}-1", name), xds_plaintext=True)
                envoys.append(EnvoyProcess(f"{name}-1", render(opts), workdir / "envoys").start(wait_live=False))
            for e in envoys:
                e.wait_live(120)
            urls = [f"http://127.0.0.1:{p}/x" for p in ports]
            asyncio.run(_until_all(urls, "blue", 120.0))
            t.loop_stall()
            cpu0 = t.probe.cpu()
            lat: list[float | None] = []
            current = "blue"
            for _ in range(changes):
                new = "green" if current == "blue" else "blue"
                host, port = ups.address(new)
                t0 = time.monotonic()
                t.register("target", host, port, new)
                t.deregister("target", current)
                lat.extend(asyncio.run(_until_all(urls, new, 30.0, t0)))
                current = new
                time.sleep(0.5)  # the drained instance is gone (drain time 0.2 s)
            return {"envoys": count, **summary(lat), "changes": changes,
                    "cpu_s_per_change": (t.probe.cpu() - cpu0) / changes, "loop_stall_ms": t.loop_stall() * 1000}
    finally:
        for e in envoys:
            e.stop()
        ups.stop()


async def _until_all(urls: list[str], app: str, timeout: float, t0: float | None = None) -> list[float | None]:
    start = time.monotonic() if t0 is None else t0
    deadline = start + timeout

    async def one(session: aiohttp.ClientSession, url: str) -> float | None:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.headers.get("x-app") == app:
                        return time.monotonic() - start
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.002)
        return None

    timeout_cfg = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout_cfg) as session:
        return list(await asyncio.gather(*(one(session, u) for u in urls)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="bigger N (5,000 streams; 10k clusters)")
    p.add_argument("--only", action="append", help="run only these scenarios (storm, large, delta, envoys)")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/xds.json (quick) or xds-full.json (--full)")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = ROOT / ("bench/results/xds-full.json" if a.full else "bench/results/xds.json")
    only = set(a.only or ["storm", "large", "delta", "envoys"])
    results: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() and a.only else {}
    results["mode"] = "full" if a.full else "quick"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xdsd-bench-") as tmp:
        work = Path(tmp)
        if "storm" in only:
            results["fleet"] = []
            for n in [100, 1000, 5000] if a.full else [100, 1000]:
                sub = work / f"fleet-{n}"
                sub.mkdir()
                print(f"fleet of {n} streams...", flush=True)
                results["fleet"].append(storm_fanout_memory(n, sub))
        if "large" in only:
            print("large cluster...", flush=True)
            (work / "large").mkdir()
            results["large"] = large_cluster(work / "large")
        if "delta" in only:
            print("delta efficiency...", flush=True)
            results["delta"] = delta_efficiency(work, [1000, 10000] if a.full else [1000, 5000])
        if "envoys" in only:
            print("20 real Envoys...", flush=True)
            (work / "envoys").mkdir()
            results["envoys"] = real_envoys(work / "envoys")
    results["seconds"] = time.monotonic() - started
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
