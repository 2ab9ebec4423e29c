"""`xdsd diff`, `apply`, `history` and `rollback` against a real xdsd and a real gateway Envoy: what
they print, their exit codes, that apply waits for the proxy's ACK (or reports its NACK), and that
rollback makes the file and what is served agree again."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS, MeshFile
from tests.support.procs import free_port
from tests.support.traffic import http_request
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


def mesh(listen: int, app: tuple[str, int], marker: str | None = None, extra_service: bool = True) -> str:
    routes = [f"      - {{prefix: /{marker}, service: app}}"] if marker else []
    routes.append("      - {prefix: /, service: app}")
    text = f"""
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {listen}}}
    routes:
{chr(10).join(routes)}
services:
  app:
    endpoints: [{{address: {app[0]}, port: {app[1]}}}]
"""
    if extra_service:
        text += "  spare:\n    endpoints: [{address: 10.9.9.9, port: 80}]\n  spare2:\n    endpoints: [{address: 10.9.9.8, port: 80}]\n"
    return text


def cli(proc: XdsdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return proc.cli(*args)


@pytest.fixture
def gateway(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
            upstreams: Callable[..., Upstreams]) -> tuple[XdsdProcess, int, tuple[str, int]]:
    ups = upstreams({"app": "127.0.0.2"})
    listen = free_port()
    app = ups.addresses["app"]
    mesh_file.write(mesh(listen, app))
    proc = xdsd()
    envoy_factory(proc, "edge-1", "edge", mode=ADS)
    proc.wait_for(lambda: http_request(f"http://127.0.0.1:{listen}/x").status == 200, "the gateway to route", 30)
    return proc, listen, app


def test_diff_apply_history_rollback(gateway: tuple[XdsdProcess, int, tuple[str, int]], mesh_file: MeshFile,
                                     tmp_path: Path) -> None:
    proc, listen, app = gateway
    original = mesh_file.path.read_text()
    assert http_request(f"http://127.0.0.1:{listen}/canary/1").status == 200  # served by the catch-all route...
    new = tmp_path / "new.yaml"
    new.write_text(mesh(listen, app, marker="canary").replace("port: 80}]\n  spare2", "port: 81}]\n  spare2"))
    diff = cli(proc, "diff", str(new))
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert "edge/ads:" in diff.stdout and "RDS ~ edge" in diff.stdout and "/canary" in diff.stdout
    assert "EDS ~ spare" not in diff.stdout  # the gateway does not route to spare: not its change
    applied = cli(proc, "apply", str(new))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "applied: config revision 2" in applied.stdout and "edge: 1 acked" in applied.stdout
    assert mesh_file.path.read_text() == new.read_text()  # the file itself was replaced
    assert cli(proc, "diff", str(new)).returncode == 0  # nothing left to change
    history = cli(proc, "history")
    assert history.returncode == 0 and "apply" in history.stdout and "file" in history.stdout
    assert history.stdout.splitlines()[0].startswith("*     2")
    shown = cli(proc, "history", "show", "1")
    assert shown.returncode == 0 and shown.stdout.split("\n", 1)[1] == original
    back = cli(proc, "rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert mesh_file.path.read_text() == original
    assert "rollback to 1" in cli(proc, "history").stdout
    assert cli(proc, "rollback", "--to", "99").returncode == 1


def test_apply_refuses_invalid_and_holds_big_removals(gateway: tuple[XdsdProcess, int, tuple[str, int]],
                                                     mesh_file: MeshFile, tmp_path: Path) -> None:
    proc, listen, app = gateway
    before = mesh_file.path.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(before.replace("service: app", "service: nope"))
    out = cli(proc, "apply", str(bad))
    assert out.returncode == 2 and "unknown service 'nope'" in out.stderr
    assert mesh_file.path.read_text() == before  # nothing written
    small = tmp_path / "small.yaml"
    small.write_text(mesh(listen, app, extra_service=False))  # drops 2 of 3 services
    out = cli(proc, "apply", str(small))
    assert out.returncode == 3 and "held" in out.stderr
    assert proc.admin_get_json("/debug/config")["held"]["removes"]["services"] == ["spare", "spare2"]
    out = cli(proc, "apply", "--allow-removal", str(small))
    assert out.returncode == 0, out.stdout + out.stderr
    assert proc.admin_get_json("/debug/config")["held"] is None
    assert proc.admin_get_json("/debug/config")["summary"].startswith("1 services")


def test_apply_reports_a_nack(gateway: tuple[XdsdProcess, int, tuple[str, int]], tmp_path: Path) -> None:
    proc, listen, app = gateway
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        moved = tmp_path / "moved.yaml"
        moved.write_text(mesh(taken, app))  # Envoy cannot bind the new listen port: it NACKs
        out = cli(proc, "apply", "--timeout", "20", str(moved))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "1 nacked" in out.stdout and "NACK" in out.stdout
    finally:
        blocker.close()
