"""Staged rollout with real Envoys: a new revision reaches the canaries first; a canary's NACK rolls
it back, and the other proxies never see it (their /config_dump shows the old listener); without a
NACK everyone gets it after the wait."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import ADS, MeshFile, edge_mesh
from tests.support.procs import free_port
from tests.support.traffic import http_request
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.rollout import choose_canaries

NODES = [f"edge-{i}" for i in range(1, 4)]
WAIT = 4


def mesh(listen: int, app: tuple[str, int], marker: str) -> dict[str, object]:
    """The gateway routes /<marker>/ to the app; revisions roll out to a 10% canary first."""
    return {"mesh": {"rollout": {"canary": "10%", "wait": f"{WAIT}s"}},
            **edge_mesh(listen, [app], service="app", prefix=f"/{marker}/")}


def listener_ports(envoy: EnvoyProcess) -> set[int]:
    dump = envoy.config_dump("dynamic_listeners")
    ports = set()
    for item in dump.get("configs", []):
        active = item.get("active_state") or item.get("warming_state")
        if active:
            ports.add(int(active["listener"]["address"]["socket_address"]["port_value"]))
    return ports


def lds_updates(envoy: EnvoyProcess) -> int:
    """LDS responses this Envoy has received (accepted or not)."""
    stats = envoy.admin_get("/stats?filter=^listener_manager\\.lds\\.update_attempt$")
    return int(stats.strip().rsplit(":", 1)[1])


def route_prefixes(envoy: EnvoyProcess) -> set[str]:
    dump = envoy.config_dump("dynamic_route_configs")
    return {r["match"]["prefix"] for c in dump.get("configs", []) for vh in c["route_config"].get("virtual_hosts", [])
            for r in vh.get("routes", [])}


@pytest.fixture
def fleet(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
          upstreams: Callable[..., Upstreams]) -> tuple[XdsdProcess, dict[str, EnvoyProcess], int, tuple[str, int]]:
    ups = upstreams({"app": "127.0.0.2"})
    listen = free_port()
    app = ups.addresses["app"]
    mesh_file.write(mesh(listen, app, "r0"))
    proc = xdsd()
    envoys = {node: envoy_factory(proc, node, "edge", mode=ADS) for node in NODES}
    proc.wait_for(lambda: all(route_prefixes(e) == {"/r0/"} for e in envoys.values()), "every gateway configured", 30)
    return proc, envoys, listen, app


def apply(proc: XdsdProcess, path: Path) -> subprocess.CompletedProcess[str]:
    return proc.cli("apply", str(path), "--timeout", "30")


def test_a_canary_nack_rolls_back_and_the_others_never_see_it(
        fleet: tuple[XdsdProcess, dict[str, EnvoyProcess], int, tuple[str, int]], tmp_path: Path) -> None:
    proc, envoys, listen, app = fleet
    canaries = choose_canaries({"edge": NODES}, 10.0)
    assert len(canaries) == 1
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    before = {node: lds_updates(envoy) for node, envoy in envoys.items()}
    try:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(mesh(blocker.getsockname()[1], app, "r0")))  # a port Envoy cannot bind: it NACKs
        out = apply(proc, bad)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "rolled back" in out.stderr and "NACK" in out.stderr
        config = proc.admin_get_json("/debug/config")
        assert config["rollout"]["state"] == "rolled_back" and config["rollout"]["nack"]["node"] in canaries
        assert "staged rollout rolled back" in config["last_error"][0]
        assert proc.metric_value("xdsd_rollouts_total", {"result": "rolled_back"}) == 1
        # Nobody serves the new listener; the non-canaries never had it, the canary has the old one back.
        for node, envoy in envoys.items():
            proc.wait_for(lambda e=envoy: listener_ports(e) == {listen}, f"{node} on the old listener", 20)
        assert http_request(f"http://127.0.0.1:{listen}/r0/x").status == 200
        for node, envoy in envoys.items():  # the others never received a listener update at all
            if node not in canaries:
                assert lds_updates(envoy) == before[node], node
            else:
                assert lds_updates(envoy) >= before[node] + 2  # the new one (NACKed), then the old one back
        assert all(p["canary"] is False for p in proc.proxies())
    finally:
        blocker.close()


def test_without_a_nack_the_canaries_go_first_then_everyone(
        fleet: tuple[XdsdProcess, dict[str, EnvoyProcess], int, tuple[str, int]], mesh_file: MeshFile) -> None:
    proc, envoys, listen, app = fleet
    canaries = choose_canaries({"edge": NODES}, 10.0)
    mesh_file.write(mesh(listen, app, "r1"))
    canary = envoys[next(iter(canaries))]
    others = [e for n, e in envoys.items() if n not in canaries]
    proc.wait_for(lambda: route_prefixes(canary) == {"/r1/"}, "the canary to get the new revision", 20)
    assert all(route_prefixes(e) == {"/r0/"} for e in others)  # ...and only the canary, for now
    assert proc.admin_get_json("/debug/config")["rollout"]["state"] == "canary"
    proc.wait_for(lambda: all(route_prefixes(e) == {"/r1/"} for e in others), "everyone after the wait", WAIT + 20)
    config = proc.admin_get_json("/debug/config")
    assert config["rollout"]["state"] == "promoted" and config["last_error"] is None
    assert proc.metric_value("xdsd_rollouts_total", {"result": "promoted"}) == 1
    history = json.loads(json.dumps(proc.admin_get_json("/v1/config/history")))
    assert [e["how"] for e in history["revisions"]] == ["file", "file"]
