"""``xdsd serve`` as a real process on free ports, with helpers for its admin API."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, free_port

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


class XdsdProcess:
    """``XdsdProcess(config_path, workdir=None, xds_port=None, admin_port=None, extra_args=None)``.

    Pass ports by keyword. Missing ports are free ports picked now and kept across ``restart()``.
    The log is ``<workdir>/xdsd.log`` (workdir defaults to a fresh temp dir), the state directory
    ``<workdir>/xdsd-state`` unless ``state_dir`` says otherwise (replicas may share one).
    """

    def __init__(
        self,
        config_path: Path,
        workdir: Path | None = None,
        xds_port: int | None = None,
        admin_port: int | None = None,
        extra_args: Sequence[str] | None = None,
        *,
        state_dir: Path | None = None,
        log_level: str = "debug",
        name: str = "xdsd",
    ) -> None:
        self.config_path = Path(config_path)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="xdsd-"))
        self.state_dir = Path(state_dir) if state_dir is not None else self.workdir / "xdsd-state"
        self.xds_port = xds_port or free_port()
        self.admin_port = admin_port or free_port()
        self.name = name
        self.extra_args = list(extra_args or [])
        # xdsd answers ext_authz over HTTP by default on port 18001: on a free port here, so that
        # servers of several tests (or of one) never meet there.
        self.authz_http_port: int | None = None
        if not {"--authz-http-address", "--no-authz-http"} & set(self.extra_args):
            self.authz_http_port = free_port()
            self.extra_args += ["--authz-http-address", f"127.0.0.1:{self.authz_http_port}"]
        self.log_path = self.workdir / f"{name}.log"
        self.proc = Proc(
            name,
            [sys.executable, "-m", "xdsd", "serve", "--config", str(self.config_path),
             "--xds-address", f"127.0.0.1:{self.xds_port}", "--admin-address", f"127.0.0.1:{self.admin_port}",
             "--log-level", log_level, "--state-dir", str(self.state_dir), *self.extra_args],
            self.log_path,
            cwd=ROOT,
        )

    def token(self, node_id: str, cluster: str, ttl: float = 86400.0) -> str:
        """A node token signed with this xdsd's key (created in its state dir if missing)."""
        from xdsd.auth.commands import mint

        return mint(self.state_dir, node_id, cluster, ttl=ttl)[0]

    def operator_token(self, ttl: float = 3600.0) -> str:
        from xdsd.auth.commands import mint
        from xdsd.auth.tokens import OPERATOR

        return mint(self.state_dir, "", "", kind=OPERATOR, ttl=ttl)[0]

    def cli(self, *args: str, admin: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``xdsd <args>`` as an operator on this host runs it: with this xdsd's state dir (so it can
        mint what it needs) and, unless ``admin=False``, its admin address."""
        where = ["--admin-address", f"127.0.0.1:{self.admin_port}"] if admin else []
        return subprocess.run([sys.executable, "-m", "xdsd", *args, *where, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    @property
    def plaintext(self) -> bool:
        return "--xds-plaintext" in self.extra_args

    def ca_bundle(self) -> bytes:
        """The bundle that verifies this xdsd's serving certificate (written when it starts)."""
        from xdsd.ca.serving import bundle_path

        return bundle_path(self.state_dir).read_bytes()

    def bootstrap_tls(self) -> dict[str, Any]:
        """BootstrapOptions keywords for reaching this xdsd: its CA bundle embedded, or plaintext."""
        if self.plaintext:
            return {"xds_plaintext": True}
        return {"xds_tls_ca_pem": self.ca_bundle()}

    def channel(self) -> Any:
        """A grpc.aio channel to the xDS port, over TLS verified like a bootstrap does (name "xdsd")."""
        import grpc

        target = f"127.0.0.1:{self.xds_port}"
        if self.plaintext:
            return grpc.aio.insecure_channel(target)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_bundle())
        return grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "xdsd")])

    @property
    def xds_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.xds_port)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> XdsdProcess:
        self.proc.start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Polls ``/readyz`` until 200; fails at once (with the log tail) if xdsd exits."""
        self.wait_for(lambda: self.http_status("/readyz") == 200, "xdsd /readyz to answer 200", timeout)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it lingers; idempotent."""
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL, no goodbye."""
        self.proc.kill()

    def restart(self, wait_ready: bool = True, timeout: float = 30.0) -> XdsdProcess:
        """Stop (if running) and start again on the same ports and state dir."""
        self.proc.stop()
        return self.start(wait_ready, timeout)

    @property
    def running(self) -> bool:
        return self.proc.running

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines)

    def wait_for(self, check: Callable[[], T], what: str | float = "condition", timeout: float | str = 30.0,
                 interval: float = 0.05) -> T:
        """``Proc.wait_for``: fails at once if xdsd died, with its log tail in the error."""
        return self.proc.wait_for(check, what, timeout, interval)

    def __enter__(self) -> XdsdProcess:
        return self if self.proc.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin API ------------------------------------------------------------------------

    def http_status(self, path: str, timeout: float = 5.0) -> int:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """The body of GET ``path`` on the admin API (also for non-2xx answers)."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.read().decode()

    def admin_get_json(self, path: str, timeout: float = 5.0) -> Any:
        return json.loads(self.admin_get(path, timeout))

    def proxies(self) -> list[dict[str, Any]]:
        """``/debug/proxies``: the connected nodes."""
        return list(self.admin_get_json("/debug/proxies"))

    def proxy(self, node_id: str) -> dict[str, Any] | None:
        return next((p for p in self.proxies() if p["node_id"] == node_id), None)

    def metrics_text(self) -> str:
        return self.admin_get("/metrics")

    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every (labels, value) of a sample named ``name`` (a counter also answers to its family
        name: ``xdsd_nacks`` finds ``xdsd_nacks_total``)."""
        out: list[tuple[dict[str, str], float]] = []
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name or (family.name == name and sample.name == f"{name}_total"):
                    out.append((dict(sample.labels), float(sample.value)))
        return out

    def metric_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of the first sample named ``name`` whose labels include ``labels``; 0 if absent."""
        for sample_labels, value in self.metric_samples(name):
            if all(sample_labels.get(k) == v for k, v in (labels or {}).items()):
                return value
        return 0.0
