"""Upstream resilience with real Envoy: outlier detection, active health checks, circuit breakers
and load-balancing policy (ring-hash stickiness)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import MeshFile, edge_mesh
from tests.support.procs import free_port, wait_for
from tests.support.stats import binomial_bounds
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

Start = Callable[..., tuple[EnvoyProcess, str]]


def _start(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory) -> Start:
    """``start(farms, **policy)``: every app of ``farms`` an endpoint of reviews, behind the gateway."""
    def start(farms: list[Upstreams], **policy: Any) -> tuple[EnvoyProcess, str]:
        gw = free_port()
        mesh_file.write(edge_mesh(gw, [addr for ups in farms for addr in ups.addresses.values()], **policy))
        envoy = envoy_factory(xdsd(), "edge-1", "edge")
        url = f"http://127.0.0.1:{gw}/r"
        wait_for(lambda: send_requests(url, 1)[0].status == 200, "traffic", 30)
        return envoy, url

    return start


def test_outlier_detection_ejects_a_5xx_endpoint_and_brings_it_back(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
        upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"a": "127.0.0.2", "b": "127.0.0.3"})
    envoy, url = _start(mesh_file, xdsd, envoy_factory)(
        [ups], outlier_detection={"consecutive_5xx": 3, "interval": "500ms", "base_ejection_time": "2s",
                                  "max_ejection_percent": 50})
    ups.set("a", status=503)
    results = send_requests(url, 200)
    failures = [i for i, r in enumerate(results) if r.status != 200]
    # Round robin: a gets every other request and is ejected at its 3rd 5xx in a row.
    assert len(failures) == 3 and failures[-1] < 10, failures
    assert all(r.app == "b" for r in results[failures[-1] + 1:])
    assert envoy.stat("cluster.reviews.outlier_detection.ejections_enforced_consecutive_5xx") == 1
    ups.set("a", status=200)
    # Back after base_ejection_time (2s), at the next interval tick.
    wait_for(lambda: "a" in {r.app for r in send_requests(url, 10)}, "a back in rotation", 10)
    assert envoy.stat("cluster.reviews.outlier_detection.ejections_active") == 0


def test_active_health_checks_remove_a_dead_endpoint_without_client_failures(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
        upstreams: Callable[..., Upstreams]) -> None:
    farm_a, farm_b = upstreams({"a": "127.0.0.2"}), upstreams({"b": "127.0.0.3"})
    envoy, url = _start(mesh_file, xdsd, envoy_factory)(
        [farm_a, farm_b],
        health_check={"path": "/health", "interval": "200ms", "timeout": "500ms", "unhealthy_threshold": 2})
    assert {r.app for r in send_requests(url, 20)} == {"a", "b"}
    a = "%s:%d" % farm_a.address("a")

    def a_failed() -> bool:
        for c in envoy.clusters()["cluster_statuses"]:
            for h in c.get("host_statuses", []) if c["name"] == "reviews" else []:
                sock = h["address"]["socket_address"]
                if f"{sock['address']}:{sock['port_value']}" == a:
                    return bool(h["health_status"].get("failed_active_health_check"))
        return False

    farm_a.stop()  # the app dies: connections refused
    envoy.wait_for(a_failed, "health checks to mark a unhealthy", 10)
    results = send_requests(url, 300)
    assert Counter(r.status for r in results) == {200: 300}
    assert {r.app for r in results} == {"b"}
    assert envoy.stat("cluster.reviews.health_check.failure") >= 2


def test_circuit_breakers_and_lb_policy_in_config_dump(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
        upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"})
    envoy, url = _start(mesh_file, xdsd, envoy_factory)(
        [ups], circuit_breakers={"max_connections": 100, "max_pending_requests": 10, "max_requests": 200, "max_retries": 2},
        load_balancer={"policy": "ring_hash", "hash_on": {"header": "x-user"}})
    dump = envoy.config_dump("dynamic_active_clusters")
    (cluster,) = [c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == "reviews"]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["circuit_breakers"]["thresholds"] == [
        {"max_connections": 100, "max_pending_requests": 10, "max_requests": 200, "max_retries": 2}]
    routes = envoy.config_dump("dynamic_route_configs")["configs"][0]["route_config"]
    assert routes["virtual_hosts"][0]["routes"][0]["route"]["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    # Sticky: one user always lands on one app; many users spread over all of them.
    seen = {}
    for user in range(30):
        apps = {r.app for r in send_requests(url, 5, headers={"x-user": f"user-{user}"})}
        assert len(apps) == 1, (user, apps)
        seen[user] = apps.pop()
    assert len(set(seen.values())) >= 2, seen


def test_a_retry_budget_is_accepted_by_envoy(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
        upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"a": "127.0.0.2"})
    envoy, url = _start(mesh_file, xdsd, envoy_factory)(
        [ups], retries={"attempts": 3, "retry_on": ["5xx"]},
        circuit_breakers={"retry_budget": {"percent": 25, "min_concurrency": 2}})
    dump = envoy.config_dump("dynamic_active_clusters")
    (cluster,) = [c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == "reviews"]
    assert cluster["circuit_breakers"]["thresholds"] == [
        {"retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 2}}]
    # Sequential requests stay within the budget's minimum concurrency: retries still hide failures
    # (a request fails only if all 3 attempts do).
    ups.set("a", failure_rate=0.3, failure_status=503)
    results = send_requests(url, 200)
    _, most_failures = binomial_bounds(200, 0.3**3)
    assert sum(r.status == 200 for r in results) >= 200 - most_failures
    fewest_first_failures, _ = binomial_bounds(200, 0.3)
    assert envoy.stat("cluster.reviews.upstream_rq_retry") >= fewest_first_failures
