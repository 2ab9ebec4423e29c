"""ext_authz benchmark: decisions per second and latency, through a real Envoy and alone.

    .venv/bin/python -m bench.authz [--seconds 10] [--runs 3] [--out bench/results/authz.json]

Variants through one Envoy (``--concurrency 1``: one core) whose front listener forwards to a
back listener that answers with a direct response (so the upstream costs next to nothing):
  none      no authorization filter
  ext_authz Envoy's ext_authz filter asking ``xdsd serve`` (gRPC, same machine)
  ext_authz_http  the same filter asking over HTTP/1.1 (``serve --authz-http-address``)
  rbac      Envoy's in-process RBAC filter with the equivalent policy: the physical limit
Load: ``wrk`` (Debian package), one connection, closed loop, so latency is per request end to end.
Also: the Authorization servicer alone under a gRPC load generator, the HTTP one under an HTTP/1.1
keep-alive load generator, and policy evaluation alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.envoy import envoy_binary
from tests.support.procs import Proc, free_port, wait_for
from xdsd.auth.tokens import TokenSigner
from xdsd.bootstrap import token_filters

POLICY_MESH = """
services:
  reviews: {}
authorization:
  reviews:
    default: deny
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: read, allow: {methods: [GET], paths: ["/reviews/*"]}}
"""


def _filter(variant: str, authz_port: int) -> list[dict[str, Any]]:
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    if variant == "none":
        return [router]
    if variant == "ext_authz_http":
        return [{
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "failure_mode_allow": False,
                "http_service": {"server_uri": {"uri": "http://xdsd", "cluster": "authz_http", "timeout": "0.5s"},
                                 "path_prefix": "/_xdsd/authz/reviews/"},
            },
        }, router]
    if variant == "ext_authz":
        return [{
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "failure_mode_allow": False,
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.5s"},
            },
        }, router]
    # RBAC with the same policy: deny /admin and /admin/*, allow GET /reviews/*, deny the rest.
    admin = {"or_rules": {"rules": [
        {"url_path": {"path": {"exact": "/admin"}}}, {"url_path": {"path": {"prefix": "/admin/"}}}]}}
    read = {"and_rules": {"rules": [
        {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
        {"url_path": {"path": {"prefix": "/reviews/"}}}]}}
    return [{
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"read": {"permissions": [
                {"and_rules": {"rules": [read, {"not_rule": admin}]}}], "principals": [{"any": True}]}}},
        },
    }, router]


def envoy_config(variant: str, admin: int, front: int, back: int, authz_port: int,
                 authz_http_port: int, token: str) -> dict[str, Any]:
    def listener(name: str, port: int, filters: list[dict[str, Any]], route: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "normalize_path": True,
                    "merge_slashes": True,
                    "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": [route]}]},
                    "http_filters": filters,
                },
            }]}],
        }

    front_route = {"match": {"prefix": "/"}, "route": {"cluster": "back"},
                   "typed_per_filter_config": {"envoy.filters.http.ext_authz": {
                       "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                       "check_settings": {"context_extensions": {"xdsd.service": "reviews"}}}}}
    back_route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    router_only = _filter("none", authz_port)

    def static_cluster(name: str, port: int, h2: bool, to_xdsd: bool = False) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        }
        options: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                   "explicit_http_config": {"http2_protocol_options": {}} if h2 else {"http_protocol_options": {}}}
        if to_xdsd:  # the node's token on every check, as `xdsd bootstrap` configures it
            options["http_filters"] = token_filters(token)
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}
        return c

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener("front", front, _filter(variant, authz_port), front_route),
                          listener("back", back, router_only, back_route)],
            "clusters": [static_cluster("back", back, False), static_cluster("authz", authz_port, True, True),
                         static_cluster("authz_http", authz_http_port, False, True)],
        },
    }


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout

    def us(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_us": us("50"), "p99_us": us("99"), "non_2xx": float(non2xx.group(1)) if non2xx else 0.0}


def eval_alone() -> dict[str, float]:
    from envoy.service.auth.v3 import external_auth_pb2

    from xdsd.authz.servicer import AuthorizationServicer
    from xdsd.model import load_mesh

    s = AuthorizationServicer()
    s.set_mesh(load_mesh(POLICY_MESH))
    req = external_auth_pb2.CheckRequest()
    req.attributes.context_extensions["xdsd.service"] = "reviews"
    req.attributes.source.principal = "spiffe://mesh.local/service/productpage"
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/reviews/1?x=1"
    req.attributes.request.http.headers.update({f"h{i}": "v" for i in range(12)})
    n = 20000
    per = min(timeit.repeat(lambda: s.decide(req), number=n, repeat=5)) / n
    return {"decide_us": per * 1e6}


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


async def servicer_alone(port: int, requests: int, concurrency: int, token: str) -> dict[str, float]:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        req = external_auth_pb2.CheckRequest()
        req.attributes.context_extensions["xdsd.service"] = "reviews"
        req.attributes.request.http.method = "GET"
        req.attributes.request.http.path = "/reviews/1"
        metadata = (("x-xdsd-token", token),)
        await stub.Check(req, metadata=metadata)
        latencies: list[float] = []

        async def worker(k: int) -> None:
            for _ in range(k):
                t = time.perf_counter()
                await stub.Check(req, metadata=metadata)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return _summary(latencies, elapsed)


async def servicer_paced(port: int, rate: int, seconds: float, token: str) -> dict[str, float]:
    """The gRPC servicer alone at a fixed rate (open loop: each check starts on schedule, whether or
    not earlier ones finished), as OPA-Envoy reports its handler latency (p99 at 1,000 rps)."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        req = external_auth_pb2.CheckRequest()
        req.attributes.context_extensions["xdsd.service"] = "reviews"
        req.attributes.source.principal = "spiffe://mesh.local/service/productpage"
        req.attributes.request.http.method = "GET"
        req.attributes.request.http.path = "/reviews/1"
        req.attributes.request.http.headers.update({":authority": "reviews", "user-agent": "bench", "accept": "*/*"})
        metadata = (("x-xdsd-token", token),)
        await stub.Check(req, metadata=metadata)
        latencies: list[float] = []

        async def one() -> None:
            t = time.perf_counter()
            await stub.Check(req, metadata=metadata)
            latencies.append(time.perf_counter() - t)

        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    latencies.sort()
    return {
        "rate": float(rate),
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


async def http_alone(port: int, requests: int, concurrency: int, token: str) -> dict[str, float]:
    """The HTTP check server alone: ``concurrency`` keep-alive connections, one check at a time each."""
    request = (b"GET /_xdsd/authz/reviews//reviews/1 HTTP/1.1\r\nhost: xdsd-authz\r\ncontent-length: 0\r\n"
               b"x-forwarded-client-cert: By=spiffe://mesh.local/service/reviews;URI=spiffe://mesh.local/service/productpage"
               b"\r\nx-xdsd-token: " + token.encode() + b"\r\n\r\n")
    latencies: list[float] = []

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(k):
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"check denied: {head[:60]!r}")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return _summary(latencies, elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="runs with one connection; the median by p99 is reported")
    parser.add_argument("--out", type=Path, default=Path("bench/results/authz.json"))
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("bench: needs wrk (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="xdsd-bench-"))
    results: dict[str, Any] = {"eval": eval_alone(), "seconds": args.seconds}
    (work / "mesh.yaml").write_text(POLICY_MESH)
    xds, admin, authz_http = free_port(), free_port(), free_port()
    xdsd = Proc("xdsd", [sys.executable, "-m", "xdsd", "serve", "--config", str(work / "mesh.yaml"),
                         "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
                         "--authz-http-address", f"127.0.0.1:{authz_http}", "--xds-plaintext",
                         "--state-dir", str(work / "state"), "--log-level", "warning"], work / "xdsd.log").start()
    token = TokenSigner.load_or_create(work / "state").issue("bench-reviews", "reviews")
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                return r.status == 200

        wait_for(ready, "xdsd ready", 30)
        results["servicer_alone"] = asyncio.run(servicer_alone(xds, 20000, 16, token))
        results["http_alone"] = asyncio.run(http_alone(authz_http, 20000, 16, token))
        results["servicer_paced"] = asyncio.run(servicer_paced(xds, 1000, 10, token))
        results["envoy"] = {}
        for variant in ("none", "ext_authz", "ext_authz_http", "rbac"):
            eadmin, front, back = free_port(), free_port(), free_port()
            cfg = work / f"envoy-{variant}.yaml"
            cfg.write_text(yaml.safe_dump(envoy_config(variant, eadmin, front, back, xds, authz_http, token)))
            envoy = Proc(f"envoy {variant}", [envoy_binary(), "-c", str(cfg), "--concurrency", "1",
                                              "--disable-hot-restart", "--log-level", "error"], work / f"{variant}.log").start()
            try:
                url = f"http://127.0.0.1:{front}/reviews/1"
                wait_for(lambda u=url: urllib.request.urlopen(u, timeout=2).status == 200, f"envoy {variant}", 30)
                wrk(url, 2, 1)  # warm up
                # One connection: three runs, the median one by p99 reported (a 2-core machine
                # has noisy neighbours); all three kept in the results.
                runs = sorted((wrk(url, args.seconds, 1) for _ in range(args.runs)), key=lambda r: r["p99_us"])
                results["envoy"][variant] = {
                    "c1": runs[len(runs) // 2],
                    "c1_runs": runs,
                    "c8": wrk(url, args.seconds, 8),
                }
            finally:
                envoy.stop()
    finally:
        xdsd.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
