"""Make-before-break with a real Envoy: a route moves to a new cluster while the old cluster is
deleted in the same edit, under steady traffic, and not one request fails."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import MeshFile, Mode, edge_mesh
from tests.support.procs import free_port, wait_for
from tests.support.traffic import SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


def test_repointing_a_route_and_deleting_the_old_cluster_drops_nothing(
    mode: Mode,
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
) -> None:
    ups = upstreams({"old": "127.0.0.2", "new": "127.0.0.3"})
    gw_port = free_port()
    url = f"http://127.0.0.1:{gw_port}/x"
    mesh_file.write(edge_mesh(gw_port, [ups.address("old")]))
    envoy = envoy_factory(xdsd(), "edge-1", "edge", mode=mode)
    wait_for(lambda: send_requests(url, 1)[0].app == "old", "traffic to the old cluster", 30)

    with SteadyTraffic(url, interval=0.002) as traffic:
        wait_for(lambda: len(traffic.results) > 50, "steady traffic", 10)
        for i in range(2, 10):
            service, app = f"reviews-v{i}", ("new", "old")[i % 2]
            mesh_file.write(edge_mesh(gw_port, [ups.address(app)], service=service))
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
