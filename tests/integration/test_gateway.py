"""A real Envoy gateway driven by a real `xdsd serve`, with real HTTP upstreams.

Every test runs in each mode Envoy can talk to xdsd: ADS or per-type streams, state of the world or
delta (the ``mode`` fixture)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import MeshFile, Mode, edge_mesh
from tests.support.procs import free_port, wait_for
from tests.support.traffic import SteadyTraffic, send_requests, share
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


class Scene:
    def __init__(self, ups: Upstreams, xdsd: XdsdProcess, envoy: EnvoyProcess, mesh: MeshFile, gw_port: int) -> None:
        self.ups, self.xdsd, self.envoy, self.mesh, self.gw_port = ups, xdsd, envoy, mesh, gw_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw_port}/reviews/1"

    def ep(self, name: str, weight: int) -> tuple[str, int, int]:
        host, port = self.ups.addresses[name]
        return (host, port, weight)

    def write(self, **weights: int) -> None:
        self.mesh.write(edge_mesh(self.gw_port, [self.ep(n, w) for n, w in weights.items()], prefix="/reviews"))

    def wait_endpoints(self, **weights: int) -> float:
        """Waits until Envoy holds exactly these endpoints with these weights; returns seconds taken."""
        t0 = time.monotonic()
        want = {"%s:%d" % self.ups.addresses[n]: w for n, w in weights.items()}
        self.envoy.wait_for(lambda: self.envoy.endpoints_of("reviews") == want, f"Envoy endpoints {want}", 30)
        return time.monotonic() - t0


@pytest.fixture
def scene(mode: Mode, mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
          upstreams: Callable[..., Upstreams]) -> Scene:
    ups = upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3", "v3": "127.0.0.4"})
    gw_port = free_port()
    s = Scene(ups, None, None, mesh_file, gw_port)  # type: ignore[arg-type]
    s.write(v1=3, v2=1)
    s.xdsd = xdsd()
    s.envoy = envoy_factory(s.xdsd, "edge-1", "edge", mode=mode)
    wait_for(lambda: send_requests(s.url, 1)[0].status == 200, "traffic through the gateway", 30)
    return s


def test_weighted_endpoints_split_traffic_3_to_1(scene: Scene) -> None:
    results = send_requests(scene.url, 400)
    assert all(r.status == 200 for r in results), share(results)
    v1 = share(results).get("v1", 0.0)
    assert 0.70 <= v1 <= 0.80, f"v1 got {v1:.1%} of 400 requests, expected 75% +/- 5"


def test_editing_the_file_moves_traffic(scene: Scene, record_property: Callable[[str, object], None]) -> None:
    scene.write(v1=3, v2=1, v3=4)
    added = scene.wait_endpoints(v1=3, v2=1, v3=4)
    results = send_requests(scene.url, 200)
    assert share(results).get("v3", 0) > 0.3

    scene.write(v3=1)
    removed = scene.wait_endpoints(v3=1)
    results = send_requests(scene.url, 50)
    assert {r.app for r in results} == {"v3"}
    record_property("seconds_to_add_endpoint", round(added, 3))
    record_property("seconds_to_remove_endpoints", round(removed, 3))
    print(f"edit -> Envoy: add {added:.3f}s, remove {removed:.3f}s")


def test_an_invalid_edit_is_refused_and_the_old_config_keeps_serving(scene: Scene) -> None:
    before = scene.xdsd.admin_get_json("/debug/config")["revision"]
    scene.mesh.write(edge_mesh(scene.gw_port, [("127.0.0.2", 0, 1)], prefix="/reviews"))  # port 0
    wait_for(lambda: scene.xdsd.metric_value("xdsd_config_rejections_total") >= 1, "the rejection metric", 15)
    config = scene.xdsd.admin_get_json("/debug/config")
    assert config["valid"] is False and config["revision"] == before
    assert any("services.reviews.endpoints[0].port" in e for e in config["last_error"])
    proxy = scene.xdsd.proxy("edge-1")
    assert proxy is not None
    assert any("endpoints[0].port" in e for e in proxy["config_error"])
    assert scene.xdsd.metric_value("xdsd_config_last_load_valid") == 0
    # Envoy keeps routing on the old config: both endpoints, 3:1.
    assert scene.envoy.endpoints_of("reviews") == {"%s:%d" % scene.ups.addresses["v1"]: 3, "%s:%d" % scene.ups.addresses["v2"]: 1}
    results = send_requests(scene.url, 100)
    assert all(r.status == 200 for r in results)
    assert {r.app for r in results} == {"v1", "v2"}
    # A valid edit after the bad one is applied.
    scene.write(v2=1)
    scene.wait_endpoints(v2=1)
    assert scene.xdsd.admin_get_json("/debug/config")["valid"] is True


def test_envoy_keeps_serving_while_xdsd_is_killed_and_converges_after_restart(scene: Scene) -> None:
    with SteadyTraffic(scene.url, interval=0.005) as traffic:
        wait_for(lambda: len(traffic.results) > 20, "some traffic", 10)
        scene.xdsd.kill()
        down_at = time.monotonic()
        scene.write(v2=1, v3=1)  # edited while the control plane is down
        wait_for(lambda: len(traffic.since(down_at)) > 200, "traffic while xdsd is down", 30)
        scene.xdsd.start()
        scene.wait_endpoints(v2=1, v3=1)
        wait_for(lambda: {r.app for r in send_requests(scene.url, 20)} == {"v2", "v3"}, "traffic on the new endpoints", 15)
        assert scene.xdsd.proxy("edge-1") is not None
    assert len(traffic.since(down_at)) > 200
    assert traffic.failures() == [], f"{len(traffic.failures())} failed of {len(traffic.results)}"
