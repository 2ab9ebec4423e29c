"""The mesh file rewritten every way people do it, under load through a real gateway Envoy: no
request fails, and each intended final content is served (a torn write never is)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS, MeshFile
from tests.support.procs import free_port
from tests.support.traffic import SteadyTraffic, http_request
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

SERVICES = ("alpha", "beta", "gamma", "delta")


def mesh(listen: int, app: tuple[str, int], marker: str) -> str:
    """A gateway routing /steady and a per-revision marker path (anything else is a 404); four
    services (a torn file drops some)."""
    services = "\n".join(f"  {name}:\n    endpoints: [{{address: {app[0]}, port: {app[1]}}}]" for name in SERVICES)
    return textwrap.dedent(f"""\
        # mesh revision {marker}
        services:
        {{services}}
        gateways:
          edge:
            listen: {{{{address: 127.0.0.1, port: {listen}}}}}
            routes:
              - {{{{prefix: /steady, service: beta}}}}
              - {{{{prefix: /{marker}/, service: alpha}}}}
        """).format(services=services)


def slow_redirect(path: Path, content: str) -> None:
    """``generate > mesh.yaml``: the shell truncates the file, the writer takes ~80 ms per chunk."""
    script = ("import sys, time\n"
              "data = sys.stdin.read()\n"
              "for i in range(0, len(data), 60):\n"
              "    sys.stdout.write(data[i:i + 60]); sys.stdout.flush(); time.sleep(0.08)\n")
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$SCRIPT" > "{path}"'], input=content, text=True,
                   env={**os.environ, "SCRIPT": script}, check=True, timeout=60)


def truncate_then_chunks(path: Path, content: str) -> None:
    """Truncate, then append chunk by chunk (each open/close), pausing less than the settle period."""
    with open(path, "r+") as f:
        f.truncate(0)
    for i in range(0, len(content), 120):
        with open(path, "a") as f:
            f.write(content[i:i + 120])
        time.sleep(0.3)


def sed_in_place(path: Path, content: str) -> None:
    marker_old = path.read_text().split("# mesh revision ", 1)[1].split("\n", 1)[0]
    marker_new = content.split("# mesh revision ", 1)[1].split("\n", 1)[0]
    subprocess.run(["sed", "-i", f"s/{marker_old}/{marker_new}/g", str(path)], check=True, timeout=30)


def editor_in_place(path: Path, content: str) -> None:
    """An editor saving in place (vim's backupcopy=yes): truncate and write through the same file."""
    with open(path, "w") as f:
        f.write(content[: len(content) // 2])
        f.flush()
        time.sleep(0.05)
        f.write(content[len(content) // 2:])


def atomic_rename(path: Path, content: str) -> None:
    tmp = path.with_name(".mesh.yaml.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def briefly_empty(path: Path, content: str) -> None:
    path.write_text("")
    time.sleep(0.4)
    path.write_text(content)


def delete_then_recreate(path: Path, content: str) -> None:
    path.unlink()
    time.sleep(0.4)
    path.write_text(content)


WRITERS: list[Callable[[Path, str], None]] = [slow_redirect, truncate_then_chunks, sed_in_place, editor_in_place,
                                               atomic_rename, briefly_empty, delete_then_recreate]


@pytest.fixture
def scene(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
          upstreams: Callable[..., Upstreams]) -> tuple[XdsdProcess, int, tuple[str, int]]:
    ups = upstreams({"app": "127.0.0.2"})
    listen = free_port()
    app = ups.addresses["app"]
    mesh_file.write(mesh(listen, app, "r0"))
    proc = xdsd()
    envoy_factory(proc, "edge-1", "edge", mode=ADS)
    proc.wait_for(lambda: http_request(f"http://127.0.0.1:{listen}/r0/x").status == 200, "the gateway to route", 30)
    return proc, listen, app


def test_every_way_of_rewriting_the_file_keeps_the_mesh_up(scene: tuple[XdsdProcess, int, tuple[str, int]],
                                                           mesh_file: MeshFile) -> None:
    proc, listen, app = scene
    path = mesh_file.path
    served_after: dict[str, float] = {}
    with SteadyTraffic(f"http://127.0.0.1:{listen}/steady", interval=0.005) as traffic:
        traffic.wait_for_count(20)
        for n, writer in enumerate(WRITERS, start=1):
            marker = f"r{n}"
            content = mesh(listen, app, marker)
            writer(path, content)
            done = time.monotonic()
            # The intended content is served: its marker route answers through the gateway.
            proc.wait_for(lambda m=marker: http_request(f"http://127.0.0.1:{listen}/{m}/x").status == 200,
                          f"revision {marker} ({writer.__name__}) to be served", 20)
            served_after[writer.__name__] = time.monotonic() - done
            assert path.read_text() == content
        traffic.wait_for_count(traffic.count() + 20)
    traffic.assert_no_failures(min_requests=100)
    rejected = proc.admin_get_json("/debug/config")
    assert rejected["file"] == "present" and rejected["held"] is None
    # Figures, for the record (measured in bench, not asserted here): how long after each write.
    print({k: round(v, 3) for k, v in served_after.items()})
