"""Zone-aware routing with real Envoy: a proxy in zone-a uses zone-a's endpoints while they are
healthy, fails over to zone-b when they are not, and comes back when they recover."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import MeshFile, edge_mesh
from tests.support.procs import free_port, wait_for
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


def test_zone_failover_and_back(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
                                envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"a1": "127.0.0.2", "a2": "127.0.0.3", "b1": "127.0.0.4"})
    gw = free_port()
    eps = [{"address": h, "port": p, "zone": "zone-b" if n == "b1" else "zone-a"} for n, (h, p) in ups.addresses.items()]
    mesh_file.write(edge_mesh(gw, eps, health_check={"path": "/health", "interval": "200ms", "timeout": "500ms",
                                                     "unhealthy_threshold": 2, "healthy_threshold": 1}))
    server = xdsd()
    envoy = envoy_factory(server, "edge-a", "edge", zone="zone-a")
    url = f"http://127.0.0.1:{gw}/r"
    wait_for(lambda: send_requests(url, 1)[0].status == 200, "traffic", 30)

    # The node's zone is priority 0, the other zone priority 1.
    dump = envoy.config_dump("dynamic_endpoint_configs", include_eds=True)
    (cla,) = [c["endpoint_config"] for c in dump["configs"] if c["endpoint_config"]["cluster_name"] == "reviews"]
    assert {e["locality"]["zone"]: e.get("priority", 0) for e in cla["endpoints"]} == {"zone-a": 0, "zone-b": 1}

    def apps(n: int = 100) -> Counter[str | None]:
        return Counter(r.app for r in send_requests(url, n))

    assert set(apps()) == {"a1", "a2"}
    for name in ("a1", "a2"):
        ups.set(name, status=503)  # /health fails too
    wait_for(lambda: apps(20) == {"b1": 20}, "failover to zone-b", 10)
    assert apps() == {"b1": 100}
    for name in ("a1", "a2"):
        ups.set(name, status=200)
    wait_for(lambda: set(apps(20)) == {"a1", "a2"}, "back to zone-a", 10)

    # A node without a zone spreads over every zone (one priority).
    other = envoy_factory(server, "edge-any", "edge", admin_port=None)
    dump = other.config_dump("dynamic_endpoint_configs", include_eds=True)
    (cla,) = [c["endpoint_config"] for c in dump["configs"] if c["endpoint_config"]["cluster_name"] == "reviews"]
    assert {e.get("priority", 0) for e in cla["endpoints"]} == {0}
