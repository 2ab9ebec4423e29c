"""Defaults shared by the commands, and ``xdsd serve``'s settings: one typed object with every
default in one place, built once from the command line; nothing else reads flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from xdsd.store.spec import StoreSpec, StoreSpecError, store_from_args


def default_state_dir() -> Path:
    """``$XDSD_STATE_DIR``, else ``$XDG_STATE_HOME/xdsd``, else ``~/.local/state/xdsd``: the same
    place for ``xdsd serve`` and ``xdsd bootstrap`` run by the same user on the control-plane host."""
    explicit = os.environ.get("XDSD_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "xdsd"


# Where xdsd answers ext_authz over HTTP/1.1 unless told otherwise: the xDS host, this port. Envoy's
# HTTP ext_authz client costs xdsd a fifth of the CPU of a gRPC Check (BENCHMARKS.md), so `xdsd
# serve` listens here by default and `xdsd bootstrap` points the checks here by default.
AUTHZ_HTTP_PORT = 18001


@dataclass(frozen=True, slots=True)
class ServeSettings:
    config: Path | None = None  # the mesh file; with an etcd store, only what seeds an empty one
    xds_address: tuple[str, int] = ("0.0.0.0", 18000)
    admin_address: tuple[str, int] = ("127.0.0.1", 19000)
    # ext_authz over HTTP/1.1 (None: over gRPC only); from the command line, the host follows
    # --xds-address's unless --authz-http-address says otherwise.
    authz_http_address: tuple[str, int] | None = ("0.0.0.0", AUTHZ_HTTP_PORT)
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "info"
    # Changes: the quiet period that coalesces file writes, and registrations into one revision.
    debounce: float = 0.05
    registry_debounce: float = 0.01
    # A file revision removing more than this share of the mesh is held until it stays for ``settle``.
    max_removal: float = 0.5
    settle: float = 5.0
    history: int = 50
    drain_time: float = 5.0
    max_instances_per_service: int = 1000
    # Connections to the xDS port from one address (an IPv6 /64) that have not yet presented a
    # token: a flood from one host is shed, oldest first. Raise it for thousands of proxies that
    # reach xdsd through one NAT address and may all reconnect at once.
    max_unauthenticated_per_source: int = 1024
    # Who may call: node and operator tokens (``required``), or anyone (``off``, experiments only).
    auth: str = "required"
    # TLS of xdsd's own ports: its own certificate by default; an operator's; or none.
    xds_plaintext: bool = False
    xds_tls_cert: Path | None = None
    xds_tls_key: Path | None = None
    xds_tls_san: tuple[str, ...] = ()
    # The CA: its own root in the state dir by default, or an operator's signing certificate.
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_bundle: Path | None = None
    xds_transport: str = "h2"  # or "grpcio"
    otlp_endpoint: str | None = None
    # Where ext_proc processors run: worker "processes" or "threads" of xdsd (xdsd/extproc/runner.py).
    processor_pool: str = "threads"
    store: StoreSpec = field(default_factory=StoreSpec)  # --store and the etcd options

    def own_secret_files(self) -> tuple[Path, ...]:
        """xdsd's own keys and passwords (and the state directory that holds more of them): never a
        mesh's ``client_secret_file`` (``xdsd.model.authentication.protect_secret_files``)."""
        found = (self.state_dir, self.xds_tls_key, self.ca_key, self.store.key, self.store.password_file)
        return tuple(p for p in found if p is not None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        """The parsed ``xdsd serve`` command line (argparse holds the same defaults, for --help)."""
        values = {}
        for f in fields(cls):
            if f.name == "store":
                continue
            if hasattr(args, f.name) and getattr(args, f.name) is not None:
                values[f.name] = getattr(args, f.name)
        if "config" in values:
            values["config"] = Path(values["config"])
        if "max_removal" in values:
            values["max_removal"] = float(values["max_removal"]) / 100.0  # the flag is a percentage
        if "xds_tls_san" in values:
            values["xds_tls_san"] = tuple(values["xds_tls_san"])
        if getattr(args, "no_authz_http", False):
            values["authz_http_address"] = None  # checks over gRPC only
        elif "authz_http_address" not in values and hasattr(args, "authz_http_address"):
            host, port = values.get("xds_address", cls.xds_address)
            values["authz_http_address"] = (host, AUTHZ_HTTP_PORT if port else 0)
        try:
            values["store"] = store_from_args(args)
        except StoreSpecError as exc:
            raise SystemExit(f"xdsd serve: {exc}") from None
        if not values["store"].etcd and values.get("config") is None:
            raise SystemExit("xdsd serve: --config is required (with --store etcd://... it only seeds an empty store)")
        return cls(**values)

    @property
    def auth_required(self) -> bool:
        return self.auth == "required"
