"""``xdsd serve`` as a real process on free ports, with helpers for its admin API."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, free_port, wait_for


class XdsdProcess:
    def __init__(self, config_path: Path, workdir: Path, xds_port: int | None = None, admin_port: int | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.config_path = config_path
        self.state_dir = workdir / "xdsd-state"
        self.xds_port = xds_port or free_port()
        self.admin_port = admin_port or free_port()
        self.proc = Proc(
            "xdsd",
            [sys.executable, "-m", "xdsd", "serve", "--config", str(config_path),
             "--xds-address", f"127.0.0.1:{self.xds_port}", "--admin-address", f"127.0.0.1:{self.admin_port}",
             "--log-level", "debug", "--state-dir", str(self.state_dir), *(extra_args or [])],
            workdir / "xdsd.log",
        )

    def token(self, node_id: str, cluster: str) -> str:
        from xdsd.auth.tokens import TokenSigner

        return TokenSigner.load_or_create(self.state_dir).issue(node_id, cluster)

    @property
    def xds_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.xds_port)

    def start(self, wait_ready: bool = True) -> XdsdProcess:
        self.proc.start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            self.proc.check_alive()
            return self.http_status("/readyz") == 200

        try:
            wait_for(ready, "xdsd /readyz", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- xdsd log ---\n{self.proc.log_tail()}") from None

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    def restart(self, wait_ready: bool = True) -> None:
        self.proc.stop()
        self.start(wait_ready)

    # -- admin API ------------------------------------------------------------------------

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def admin_get(self, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.read().decode()

    def admin_get_json(self, path: str) -> Any:
        return json.loads(self.admin_get(path))

    def proxies(self) -> list[dict[str, Any]]:
        return list(self.admin_get_json("/debug/proxies"))

    def proxy(self, node_id: str) -> dict[str, Any] | None:
        return next((p for p in self.proxies() if p["node_id"] == node_id), None)

    def metric_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample (``name`` as exposed, e.g. ``xdsd_nacks_total``); 0 if absent."""
        for family in text_string_to_metric_families(self.admin_get("/metrics")):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return float(sample.value)
        return 0.0

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines)
