"""Memory under churn (issue 19, item 5): registrations and heartbeats at a steady rate for minutes,
with streams connected; xdsd's RSS over time and its slope once the live set is steady.

    .venv/bin/python -m bench.soak [--minutes 7] [--tracemalloc] [--out bench/results/soak.json] [--note TEXT]

Mesh: 50 services x 4 endpoints, sidecars calling 5 services each; 200 ADS streams (bench.h2grpc).
Load: 16 registrations a second (instance ids cycle through 1,000, TTL 3 s, each service in turn),
and 8 heartbeats a second (every other instance, 1 s after it registered, so it lives 4 s): ~50-60
instances live at any time, so the live set is steady after a few seconds and memory should be
flat. RSS (VmRSS) is sampled every 5 s; the slope is fitted over the second half of the run.

With ``--tracemalloc`` xdsd runs in-process (bench.inproc: the real App) with tracemalloc (12
frames); snapshots are taken at a quarter and at the end of the run, and the allocation sites that
grew between them are reported (by line, and by the xdsd frame nearest to the allocation). Each
snapshot also reports what a full ``gc.collect()`` then frees: cyclic garbage the tuned collector
(frozen start-up heap, thresholds 50,000/20/100) had not collected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

from bench import meshgen
from bench.loadgen import LoadGenerator

RATE = 16.0  # registrations a second
IDS = 1000
TTL = "3s"
FRAMES = 12  # tracemalloc frames kept per allocation (more slows xdsd past the churn rate)


async def _churn(admin: str, tokens: dict[str, str], seconds: float, samples: list[dict[str, Any]],
                 sample: Any, rate: float = RATE) -> dict[str, int]:
    """Registrations at ``rate`` and heartbeats at half of it, for ``seconds``; ``sample()`` every 5 s."""
    services = sorted(tokens)
    stats = {"registrations": 0, "heartbeats": 0, "errors": 0}
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_sample = start
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                     connector=aiohttp.TCPConnector(limit=16)) as session:

        async def post(path: str, body: dict[str, Any], service: str, key: str) -> None:
            try:
                async with session.post(admin + path, json=body, headers={"x-xdsd-token": tokens[service]}) as r:
                    await r.read()
                    if r.status == 200:
                        stats[key] += 1
                    else:
                        stats["errors"] += 1
                        stats[f"http {r.status}"] = stats.get(f"http {r.status}", 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                stats["errors"] += 1

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)

        k = 0
        while True:
            now = loop.time()
            if now - start >= seconds:
                break
            if now >= next_sample:
                samples.append({"t": now - start, "registrations": stats["registrations"], **sample()})
                next_sample += 5.0
            service = services[k % len(services)]
            iid = f"soak-{k % IDS}"
            a = k % 250
            spawn(post("/v1/register", {"service": service, "instance_id": iid, "address": f"10.250.{k % IDS // 250}.{a + 1}",
                                        "port": meshgen.INBOUND_PORT, "ttl": TTL}, service, "registrations"))
            back = k - int(rate)  # the instance registered a second ago
            if back >= 0 and back % 2 == 0:
                spawn(post("/v1/heartbeat", {"service": services[back % len(services)],
                                             "instance_id": f"soak-{back % IDS}"}, services[back % len(services)],
                           "heartbeats"))
            k += 1
            await asyncio.sleep(max(0.0, start + k / rate - loop.time()))
        if pending:
            await asyncio.wait(pending, timeout=10)
        try:  # a slow xdsd (tracemalloc, a busy machine) costs this figure, not the run's
            async with session.get(admin + "/v1/instances", headers={"x-xdsd-token": tokens[services[0]]},
                                   timeout=aiohttp.ClientTimeout(total=60)) as r:
                stats["live_at_end"] = len((await r.json()).get("instances", [])) if r.status == 200 else -1
        except (aiohttp.ClientError, TimeoutError):
            stats["live_at_end"] = -1
    return stats


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def _growth(first: Path, last: Path, top: int = 20) -> dict[str, Any]:
    """Allocation sites that grew between two tracemalloc snapshots: by line, and by the xdsd frame
    nearest to the allocation (the code that kept it)."""
    a = tracemalloc.Snapshot.load(str(first))
    b = tracemalloc.Snapshot.load(str(last))
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a, b = a.filter_traces(skip), b.filter_traces(skip)

    def row(stat: Any) -> dict[str, Any]:
        return {"size_diff_kib": round(stat.size_diff / 1024, 1), "count_diff": stat.count_diff,
                "size_kib": round(stat.size / 1024, 1), "at": str(stat.traceback[0])}

    by_line = [row(s) for s in b.compare_to(a, "lineno")[:top] if s.size_diff > 0]
    # The nearest xdsd frame of each trace (or the allocation itself): who holds the growth.
    def owner(tb: tracemalloc.Traceback) -> str:
        for frame in reversed(tb):  # most recent first (a Traceback runs oldest to newest)
            if "/xdsd/" in frame.filename:
                return f"{frame.filename.split('/xdsd/', 1)[1]}:{frame.lineno}"
        return f"{tb[0].filename}:{tb[0].lineno}"

    def group(snap: tracemalloc.Snapshot) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for st in snap.statistics("traceback"):
            key = owner(st.traceback)
            size, count = out.get(key, (0, 0))
            out[key] = (size + st.size, count + st.count)
        return out

    ga, gb = group(a), group(b)
    diffs = sorted(((gb[k][0] - ga.get(k, (0, 0))[0], gb[k][1] - ga.get(k, (0, 0))[1], k) for k in gb), reverse=True)
    by_owner = [{"size_diff_kib": round(d / 1024, 1), "count_diff": c, "xdsd_frame": k} for d, c, k in diffs[:top] if d > 0]
    # The longest traceback of the top growing site, to read the path that allocates it.
    tb = b.compare_to(a, "traceback")
    example = [str(f) for f in reversed(tb[0].traceback)] if tb else []
    return {"by_line": by_line, "by_xdsd_frame": by_owner, "top_traceback": example[:25]}


def soak(workdir: Path, seconds: float = 420.0, streams: int = 200, trace: bool = False,
         cpus: tuple[frozenset[int] | None, frozenset[int] | None] = (None, None)) -> dict[str, Any]:
    from bench.xds import Target  # bench.xds imports this module lazily: no cycle at import time

    mesh = meshgen.mesh(50, 4, upstreams=5)
    clients = meshgen.client_services(mesh)
    instruments = ["--tracemalloc", str(FRAMES)] if trace else None
    out: dict[str, Any] = {"seconds": seconds, "streams": streams, "rate": RATE, "ttl": TTL, "ids": IDS,
                           "tracemalloc": trace}
    with Target(mesh, workdir, cpus[0], instruments=instruments) as t, \
            LoadGenerator(t.target, 1, "h2", cpus[1]) as lg:
        ready, errors = lg.connect(t.specs(streams, clients), timeout=300)
        out["connected"] = sum(r is not None for r in ready)
        tokens = {s: t.xdsd.token(f"soak-{s}", s) for s in mesh["services"]}
        time.sleep(1.0)
        cpu0, rss0 = t.probe.cpu(), t.probe.rss()
        samples: list[dict[str, Any]] = []
        snaps: list[int] = []

        def sample() -> dict[str, Any]:
            row = {"rss_mb": round(t.probe.rss() / 2**20, 2)}
            if trace and samples and len(snaps) == 0 and samples[-1]["t"] >= seconds / 4:
                snaps.append(1)
                os.kill(t.pid, signal.SIGUSR1)
            return row

        stats = asyncio.run(_churn(t.xdsd.admin_url, tokens, seconds, samples, sample))
        time.sleep(2.0)
        samples.append({"t": seconds + 2.0, "registrations": stats["registrations"],
                        "rss_mb": round(t.probe.rss() / 2**20, 2)})
        out["cpu_s"] = t.probe.cpu() - cpu0
        out["rss_start_mb"] = rss0 / 2**20
        out["rss_end_mb"] = t.probe.rss() / 2**20
        out["churn"] = stats
        out["samples"] = samples
        half = [s for s in samples if s["t"] >= seconds / 2]
        per_s = _slope([(s["t"], s["rss_mb"]) for s in half])
        per_reg = _slope([(s["registrations"], s["rss_mb"]) for s in half])
        out["slope_mb_per_minute"] = per_s * 60
        out["slope_kib_per_registration"] = per_reg * 1024
        whole = _slope([(s["registrations"], s["rss_mb"]) for s in samples])
        out["slope_kib_per_registration_whole_run"] = whole * 1024
        out["errors"] = errors[:5]
        if trace:
            os.kill(t.pid, signal.SIGUSR1)
            snapdir = t.snapshots
            t.xdsd.wait_for(lambda: (snapdir / "snap-2.json").exists(), "the last tracemalloc snapshot", 300)
            out["gc"] = [json.loads((snapdir / f"snap-{i}.json").read_text()) for i in (1, 2)]
            for g in out["gc"]:
                g.pop("gc_stats", None)
            out["growth"] = _growth(snapdir / "snap-1.tracemalloc", snapdir / "snap-2.tracemalloc")
            # What grew and survived a full collection (the second snapshot of each pair is after gc.collect()).
            out["growth_after_collect"] = _growth(snapdir / "snap-1-collected.tracemalloc",
                                                  snapdir / "snap-2-collected.tracemalloc")
            regs = [s["registrations"] for s in samples]
            out["registrations_between_snapshots"] = regs[-1] - next(
                (s["registrations"] for s in samples if s["t"] >= seconds / 4), regs[0])
    return out


def _commit() -> str:
    """The commit measured, ``+dirty`` when the work tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--note", default="", help="what was measured (e.g. a commit before a fix), shown by bench.report")
    a = p.parse_args(argv)
    from bench.profiling import split_cpus

    cpus = (None, None) if a.no_pin else split_cpus()
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    out = a.out or Path(__file__).resolve().parent / "results" / ("soak-tracemalloc.json" if a.tracemalloc else "soak.json")
    commit = _commit()  # what xdsd loads now (an editable install reads the work tree)
    with tempfile.TemporaryDirectory(prefix="xdsd-soak-") as tmp:
        result = soak(Path(tmp), a.minutes * 60, a.streams, a.tracemalloc, cpus)
    result["note"] = a.note
    result["commit"] = commit
    result["load_average_end"] = os.getloadavg()  # the machine may be shared: what else ran shows here
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
