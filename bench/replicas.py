"""Replicas on etcd (issue 20): how fast a registration reaches Envoys on every replica, how many
registrations and heartbeats per second three replicas take, what each costs etcd, and a replica's
CPU at idle. Real parts: a 3-member etcd cluster on loopback, three ``xdsd serve --store etcd://``
replicas, one Envoy (``--concurrency 1``) on each replica.

    .venv/bin/python -m bench.replicas [--samples 40] [--seconds 8] [--concurrency 16]

Writes bench/results/replicas.json and prints the BENCHMARKS.md section. Everything shares the
machine's cores (2 here): the figures are for that, not for three machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.envoy import EnvoyProcess
from tests.support.etcd import EtcdCluster
from tests.support.meshes import edge_mesh
from tests.support.procs import free_port
from tests.support.xdsd_proc import XdsdProcess
from xdsd.bootstrap import BootstrapOptions, render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results/replicas.json"


def etcd_metrics(cluster: EtcdCluster) -> dict[str, float]:
    """Counters summed over the members (proposals and puts: member 0's; every member applies each)."""
    out: dict[str, float] = {"client_bytes_in": 0.0, "client_bytes_out": 0.0}
    for n, m in enumerate(cluster.members):
        text = urllib.request.urlopen(m.client_url + "/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            if name.startswith("etcd_network_client_grpc_received_bytes_total"):
                out["client_bytes_in"] += float(value)
            elif name.startswith("etcd_network_client_grpc_sent_bytes_total"):
                out["client_bytes_out"] += float(value)
            elif n == 0 and name == "etcd_server_proposals_committed_total":
                out["proposals"] = float(value)
            elif n == 0 and name == "etcd_mvcc_put_total":
                out["puts"] = float(value)
            elif n == 0 and name == "etcd_mvcc_db_total_size_in_use_in_bytes":
                out["db_in_use"] = float(value)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks (USER_HZ 100)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, workdir: Path, samples: int, seconds: float, concurrency: int) -> None:
        self.workdir = workdir
        self.samples, self.seconds, self.concurrency = samples, seconds, concurrency
        self.cluster = EtcdCluster(workdir / "etcd", 3)
        (workdir / "etcd").mkdir(parents=True)
        self.replicas: list[XdsdProcess] = []
        self.envoys: list[EnvoyProcess] = []
        self.token = ""
        self.next_ip = 0

    def start(self) -> None:
        self.cluster.start()
        mesh = self.workdir / "mesh.yaml"
        mesh.write_text(json.dumps(edge_mesh(free_port(), [("127.0.0.2", free_port())])))
        for i in range(3):
            (self.workdir / f"r{i}").mkdir()
            r = XdsdProcess(mesh, self.workdir / f"r{i}", name=f"r{i}", log_level="warning",
                            extra_args=["--store", self.cluster.store_url, "--xds-plaintext",
                                        "--max-instances-per-service", "1000000"])
            self.replicas.append(r.start(timeout=60))
        self.token = self.replicas[0].token("bench", "reviews")
        for i, r in enumerate(self.replicas):
            opts = BootstrapOptions(node_id=f"edge-{i}", cluster="edge", xds_port=r.xds_port, admin_port=free_port(),
                                    xds_plaintext=True, token=r.token(f"edge-{i}", "edge"))
            (self.workdir / f"envoy-{i}").mkdir()
            self.envoys.append(EnvoyProcess(f"edge-{i}", render(opts), self.workdir / f"envoy-{i}").start())
        for e in self.envoys:
            e.wait_for(lambda e=e: self.members(e) >= 1, "Envoy to get reviews", 60)

    def stop(self) -> None:
        for e in self.envoys:
            e.stop()
        for r in self.replicas:
            r.stop()
        self.cluster.stop()

    @staticmethod
    def members(envoy: EnvoyProcess) -> int:
        text = envoy.admin_get("/stats?filter=^cluster.reviews.membership_total$")
        return int(text.rsplit(":", 1)[1]) if ":" in text else 0

    def seen(self, envoy: EnvoyProcess, n: int, t0: float, timeout: float = 30.0) -> float:
        """Seconds from ``t0`` until ``envoy`` has ``n`` reviews endpoints (polled every 2 ms)."""
        while self.members(envoy) < n:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{envoy.name} did not get the registration within {timeout}s")
            time.sleep(0.002)
        return time.perf_counter() - t0

    def instance(self, ttl: str = "120s") -> dict[str, Any]:
        self.next_ip += 1
        n = self.next_ip
        return {"service": "reviews", "instance_id": f"i{n}", "address": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                "port": 8080, "ttl": ttl}

    # -- registration -> every Envoy ----------------------------------------------------------

    async def propagation(self, session: aiohttp.ClientSession) -> list[float]:
        out = []
        loop = asyncio.get_running_loop()
        for k in range(self.samples):
            replica = self.replicas[k % 3]
            want = [self.members(e) + 1 for e in self.envoys]
            t0 = time.perf_counter()
            async with session.post(replica.admin_url + "/v1/register", json=self.instance(),
                                    headers={"x-xdsd-token": self.token}) as resp:
                assert resp.status == 200, await resp.text()

            times = await asyncio.gather(*(loop.run_in_executor(None, self.seen, e, n, t0)
                                           for e, n in zip(self.envoys, want, strict=True)))
            out.append(max(times))
            await asyncio.sleep(0.05)
        return out

    # -- sustained load ------------------------------------------------------------------------

    async def sustained(self, session: aiohttp.ClientSession, path: str, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        before = etcd_metrics(self.cluster)
        ok = failed = 0
        deadline = time.perf_counter() + self.seconds
        queue = list(bodies)
        done: list[dict[str, Any]] = []

        async def worker(w: int) -> None:
            nonlocal ok, failed
            i = w
            while time.perf_counter() < deadline:
                body = queue[i % len(queue)] if path == "/v1/heartbeat" else self.instance()
                replica = self.replicas[i % 3]
                i += self.concurrency
                async with session.post(replica.admin_url + path, json=body, headers={"x-xdsd-token": self.token}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                        if path == "/v1/register":
                            done.append({"service": body["service"], "instance_id": body["instance_id"]})
                    else:
                        failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(self.concurrency)))
        elapsed = time.perf_counter() - t0
        after = etcd_metrics(self.cluster)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        per = max(ok, 1)
        return {"ok": ok, "failed": failed, "seconds": round(elapsed, 2), "per_second": round(ok / elapsed, 1),
                "proposals_per_op": round(delta.get("proposals", 0) / per, 2),
                "puts_per_op": round(delta.get("puts", 0) / per, 2),
                "client_bytes_in_per_op": round(delta["client_bytes_in"] / per),
                "client_bytes_out_per_op": round(delta["client_bytes_out"] / per),
                "db_growth_bytes_per_op": round(delta.get("db_in_use", 0) / per), "ids": done}

    def idle_cpu(self, seconds: float = 20.0) -> list[float]:
        pids = [r.proc.pid for r in self.replicas]
        before = [cpu_seconds(p) for p in pids if p]
        time.sleep(seconds)
        after = [cpu_seconds(p) for p in pids if p]
        return [round(100 * (b - a) / seconds, 2) for a, b in zip(before, after, strict=True)]

    async def run(self) -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            prop = await self.propagation(session)
            reg = await self.sustained(session, "/v1/register", [])
            ids = reg.pop("ids")
            await asyncio.sleep(1)
            beat = await self.sustained(session, "/v1/heartbeat", ids)
            beat.pop("ids")
        registered = self.next_ip
        await asyncio.sleep(2)
        idle = self.idle_cpu()
        return {"samples": len(prop), "propagation_p50_ms": round(1000 * statistics.median(prop), 1),
                "propagation_p99_ms": round(1000 * pct(prop, 99), 1), "propagation_max_ms": round(1000 * max(prop), 1),
                "register": reg, "heartbeat": beat, "concurrency": self.concurrency,
                "idle_cpu_percent": idle, "idle_instances": registered, "envoys": len(self.envoys)}


def section(r: dict[str, Any]) -> str:
    reg, beat = r["register"], r["heartbeat"]
    return f"""## Replicas on etcd (issue 20)

Command: `.venv/bin/python -m bench.replicas` (figures in bench/results/replicas.json). A 3-member etcd
cluster (etcd 3.4, loopback, `--heartbeat-interval 50 --election-timeout 500`), three `xdsd serve --store
etcd://... --xds-plaintext` replicas, one Envoy (`--concurrency 1`) connected to each replica, all on the
same 2 cores. Registrations and heartbeats go to the replicas' HTTP API in turn, {r['concurrency']} in flight.

| measure | result |
|---|---|
| registration through one replica → in the EDS of the Envoys on all three ({r['samples']} samples, one at a time; Envoy stats polled) | p50 {r['propagation_p50_ms']} ms, p99 {r['propagation_p99_ms']} ms (max {r['propagation_max_ms']} ms) |
| sustained registrations, 3 replicas | {reg['per_second']:,} /s ({reg['ok']:,} in {reg['seconds']} s, {reg['failed']} failed) |
| sustained heartbeats, 3 replicas | {beat['per_second']:,} /s ({beat['ok']:,} in {beat['seconds']} s, {beat['failed']} failed) |
| etcd per registration | {reg['proposals_per_op']} raft proposals (lease grant + one transaction), {reg['puts_per_op']} puts (the registration, its address claim, its token's owner key; reads of the stored instance and the quota counts are no proposals); {reg['client_bytes_in_per_op']:,} bytes in from clients (all members), {reg['client_bytes_out_per_op']:,} bytes out (the watches of three replicas included); db grows {reg['db_growth_bytes_per_op']:,} bytes |
| etcd per heartbeat | {beat['proposals_per_op']} raft proposals, {beat['puts_per_op']} puts (a lease keep-alive, no write); {beat["client_bytes_in_per_op"]:,} bytes in, {beat["client_bytes_out_per_op"]:,} bytes out (gRPC message bytes by etcd's counters: HTTP/2 framing not included) |
| replica CPU at idle ({r['envoys']} Envoys, {r['idle_instances']:,} registered instances, no changes; 20 s) | {', '.join(f'{c} %' for c in r['idle_cpu_percent'])} of a core |
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        bench = Bench(Path(tmp), args.samples, args.seconds, args.concurrency)
        try:
            bench.start()
            result = asyncio.run(bench.run())
        finally:
            bench.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(section(result))


if __name__ == "__main__":
    main()
