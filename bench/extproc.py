"""External processing benchmark: the latency a processing step adds per request, through a real
Envoy gateway, at a fixed request rate, and how long xdsd's event loop stalled meanwhile.

    .venv/bin/python -m bench.extproc [--rate 200] [--seconds 10] [--out bench/results/extproc.json]

One ``xdsd serve`` (TLS, tokens: the defaults), one gateway Envoy (``--concurrency 1``) and one
upstream app (tests/support/upstream.py); the gateway's routes differ only in their processing step:
  none        no processing
  headers     set-headers on request_headers (one ext_proc message per request)
  buffered    json-schema on request_headers + request_body, a 1 KiB JSON body (two messages)
  spin-2ms    a user processor that holds the GIL for 2 ms of Python per request (the worst case
              for worker threads: it competes with the event loop for the interpreter)
Load: an open loop at a fixed rate over 8 keep-alive connections; each request's latency runs from
its scheduled send time (a late send counts, no coordinated omission). The event-loop stall is
``/debug/loop?reset=1`` read after each run (the longest a 5 ms timer was late during it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS
from tests.support.procs import free_port, wait_for
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

BODY = json.dumps({"name": "x", "pad": "p" * (1024 - len(json.dumps({"name": "x", "pad": ""})))}).encode()
assert len(BODY) == 1024

VARIANTS: dict[str, tuple[str, str, bytes | None]] = {  # name -> (method, path, body)
    "none": ("GET", "/none", None),
    "headers": ("GET", "/headers", None),
    "buffered": ("POST", "/buffered", BODY),
    "spin-2ms": ("GET", "/spin", None),
}


def mesh(host: str, port: int, edge: int) -> str:
    return f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {edge}}}
    routes:
      - {{prefix: /none, service: web}}
      - prefix: /headers
        service: web
        processing: {{processor: set-headers, args: {{request: {{set: {{x-route: "{{method}} {{path}}"}}}}}}}}
      - prefix: /buffered
        service: web
        processing:
          processor: json-schema
          phases: [request_headers, request_body]
          args: {{schema: {{type: object, required: [name], properties: {{name: {{type: string}}}}}}}}
      - prefix: /spin
        service: web
        processing: {{processor: "bench.extproc_processors:spin", args: {{ms: 2}}, timeout: 1s}}
"""


def fixed_rate(port: int, method: str, path: str, body: bytes | None, rate: float, seconds: float,
               connections: int = 8) -> dict[str, Any]:
    """Requests at ``rate`` per second for ``seconds``; latency from each one's scheduled time."""
    due: queue.Queue[float | None] = queue.Queue()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    headers = {"content-type": "application/json"} if body else {}

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (t := due.get()) is not None:
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                ok, resp = False, None
                with lock:
                    errors.append(type(exc).__name__)
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if not ok and resp is not None:
                    errors.append(str(resp.status))
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for th in threads:
        th.start()
    start = time.perf_counter() + 0.1
    n = int(rate * seconds)
    for i in range(n):
        due.put(start + i / rate)
    for _ in threads:
        due.put(None)
    for th in threads:
        th.join(seconds + 60)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"requests": n, "answered": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "p50_ms": round(pct(0.50), 3), "p99_ms": round(pct(0.99), 3), "max_ms": round(pct(1.0), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pool", choices=["threads", "processes"], default="threads",
                    help="xdsd serve --processor-pool")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-extproc-"))
    ups = Upstreams({"web": "127.0.0.2"}, work / "upstream").start()
    server = envoys = None
    results: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds, "pool": args.pool, "variants": {}}
    try:
        host, port = ups.address("web")
        edge = free_port()
        (work / "mesh.yaml").write_text(mesh(host, port, edge))
        server = XdsdProcess(work / "mesh.yaml", work / "xdsd", log_level="info",
                             extra_args=["--processor-pool", args.pool])
        (work / "xdsd").mkdir(exist_ok=True)
        server.start()
        envoys = EnvoyFactory(work)
        envoys(server, "edge-1", "edge", mode=ADS)
        for name in args.variants.split(","):
            method, path, body = VARIANTS[name]
            wait_for(lambda m=method, p=path, b=body: _status(edge, m, p, b) == 200, f"{name} serves", 30)
            fixed_rate(edge, method, path, body, args.rate, 1.0)  # warm-up
            server.admin_get("/debug/loop?reset=1")
            row = fixed_rate(edge, method, path, body, args.rate, args.seconds)
            loop = json.loads(server.admin_get("/debug/loop?reset=1"))
            row["loop_stall_ms"] = round(loop["max_stall_seconds"] * 1000, 2)
            row["gc_ms"] = round(loop.get("max_gc_seconds", 0.0) * 1000, 2)
            results["variants"][name] = row
            print(f"{name:10} {json.dumps(row)}", flush=True)
    finally:
        if envoys is not None:
            envoys.stop_all()
        if server is not None:
            server.stop()
        ups.stop()
    base = results["variants"].get("none")
    print("\n| variant | rate (rps) | p50 ms | p99 ms | max ms | added p50 ms | added p99 ms | errors | loop stall ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results["variants"].items():
        added = ("–", "–") if base is None or name == "none" else (
            f"{row['p50_ms'] - base['p50_ms']:.2f}", f"{row['p99_ms'] - base['p99_ms']:.2f}")
        print(f"| {name} | {args.rate:g} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.2f} | "
              f"{added[0]} | {added[1]} | {row['errors']} | {row['loop_stall_ms']:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _status(port: int, method: str, path: str, body: bytes | None) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        status = conn.getresponse().status
        conn.close()
        return status
    except (OSError, http.client.HTTPException):
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
