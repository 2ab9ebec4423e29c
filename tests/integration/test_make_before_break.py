"""Make-before-break with a real Envoy: a route moves to a new cluster while the old cluster is
deleted in the same edit, under steady traffic, and not one request fails."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.conftest import MeshFile, Mode
from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port, wait_for
from tests.support.traffic import SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


def mesh(gw_port: int, service: str, host: str, port: int) -> str:
    return f"""
services:
  {service}:
    endpoints: [{{address: {host}, port: {port}}}]
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {gw_port}}}
    routes:
      - {{prefix: /, service: {service}}}
"""


def test_repointing_a_route_and_deleting_the_old_cluster_drops_nothing(
    mode: Mode,
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
) -> None:
    ups = start_upstreams({"old": "127.0.0.2", "new": "127.0.0.3"})
    gw_port = free_port()
    url = f"http://127.0.0.1:{gw_port}/x"
    mesh_file.write(mesh(gw_port, "reviews", *ups.addresses["old"]))
    xdsd = start_xdsd(mesh_file.path)
    envoy = start_envoy(xdsd, "edge-1", "edge", mode)
    wait_for(lambda: send_requests(url, 1)[0].app == "old", "traffic to the old cluster", 30)

    with SteadyTraffic(url, interval=0.002) as traffic:
        wait_for(lambda: len(traffic.results) > 50, "steady traffic", 10)
        for i in range(2, 10):
            service, app = f"reviews-v{i}", ("new", "old")[i % 2]
            mesh_file.write(mesh(gw_port, service, *ups.addresses[app]))
            envoy.wait_for(
                lambda s=service: [c["name"] for c in envoy.clusters()["cluster_statuses"] if c["name"].startswith("reviews")] == [s],
                f"Envoy to hold only cluster {service}",
                30,
            )
            n = len(traffic.results)
            wait_for(lambda a=app, n=n: any(r.app == a for r in traffic.results[n:]), f"traffic on {app}", 15)
            wait_for(lambda n=n: len(traffic.results) > n + 50, "more traffic", 15)
    failures = traffic.failures()
    assert len(traffic.results) > 400
    assert failures == [], f"{len(failures)} of {len(traffic.results)} requests failed: {failures[:5]}"
