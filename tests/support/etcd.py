"""Real etcd processes on loopback for tests: a 1- or 3-member cluster on free ports, data in a
temporary directory, stopped (every member) when the test ends. Members can be stopped and started
again to take quorum away and give it back."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Proc, free_port, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def etcd_available() -> bool:
    return Path(ETCD).exists()


class EtcdMember:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Proc | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self, initial_cluster: str, token: str) -> list[str]:
        return [ETCD, "--name", self.name, "--data-dir", str(self.workdir / f"{self.name}.etcd"),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap",
                "--heartbeat-interval", "50", "--election-timeout", "500"]

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.client_url + "/health", timeout=1) as r:
            return bool(json.loads(r.read()).get("health") == "true")


class EtcdCluster:
    def __init__(self, workdir: Path, members: int = 3) -> None:
        self.workdir = workdir
        self.members = [EtcdMember(f"m{i}", workdir) for i in range(members)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self.token = f"xdsd-test-{id(self)}"

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    @property
    def store_url(self) -> str:
        return "etcd://" + self.endpoints

    def start_member(self, m: EtcdMember) -> None:
        m.proc = Proc(f"etcd-{m.name}", m.command(self.initial, self.token), self.workdir / f"etcd-{m.name}.log")
        m.proc.start()

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            self.start_member(m)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(lambda: all(m.proc is not None and m.proc.running and m.healthy() for m in self.members),
                 "every etcd member healthy", timeout)

    def stop_member(self, m: EtcdMember) -> None:
        if m.proc is not None:
            m.proc.stop()

    def stop(self) -> None:
        for m in self.members:
            self.stop_member(m)

    def logs(self) -> str:
        return "\n".join(m.proc.log_tail(20) for m in self.members if m.proc is not None)


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster on loopback."""
    if not etcd_available():
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    cluster = EtcdCluster(tmp_path / "etcd", 3)
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def etcd_single(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One real etcd member on loopback."""
    if not etcd_available():
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    cluster = EtcdCluster(tmp_path / "etcd", 1)
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
