"""The mesh files integration tests write, and the ways an Envoy fetches its configuration.

Builders return the mesh as a dict (``MeshFile.write`` takes a dict or text), so a test changes one
field with ``mesh_file.update(lambda m: ...)`` instead of editing YAML text:

    edge_mesh(gw_port, [("127.0.0.2", 8080, 3), ("127.0.0.3", 8080)], retries={"attempts": 3})
        one service behind the gateway ``edge`` on 127.0.0.1:<gw_port>
    sidecar_mesh(apps, inbound_port, {"productpage": {"reviews": out_port}})
        services whose instances run a sidecar, one loopback "machine" per service
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml


@dataclass(frozen=True)
class Mode:
    """How Envoy talks to xdsd: aggregated (ADS) or per-type streams; state of the world or delta."""

    ads: bool
    delta: bool

    @property
    def id(self) -> str:
        return ("ads" if self.ads else "per-type") + ("-delta" if self.delta else "-sotw")


MODES = [Mode(ads=True, delta=False), Mode(ads=True, delta=True), Mode(ads=False, delta=False), Mode(ads=False, delta=True)]
ADS_MODES = [m for m in MODES if m.ads]
ADS = MODES[0]  # what `xdsd bootstrap` gives by default


def mode_ids(modes: Iterable[Mode]) -> list[str]:
    return [m.id for m in modes]


class MeshFile:
    """The mesh config file xdsd watches. Every write is atomic (temp file, then os.replace), as
    editors and config management do, so xdsd never reads a half-written file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, content: str | Mapping[str, Any]) -> Path:
        text = content if isinstance(content, str) else yaml.safe_dump(dict(content), sort_keys=False)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        return self.path

    def write_yaml(self, data: Mapping[str, Any]) -> Path:
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


# An endpoint: (host, port), (host, port, weight), or the mesh's own mapping (zone, labels, ...).
Endpoint = tuple[str, int] | tuple[str, int, int] | Mapping[str, Any]


def endpoint(e: Endpoint) -> dict[str, Any]:
    if isinstance(e, Mapping):
        return dict(e)
    out: dict[str, Any] = {"address": e[0], "port": e[1]}
    if len(e) == 3:
        out["weight"] = e[2]
    return out


def edge_mesh(gw_port: int, endpoints: Iterable[Endpoint], *, service: str = "reviews", prefix: str = "/",
              gateway: str = "edge", **service_fields: Any) -> dict[str, Any]:
    """One service behind one gateway: ``service`` with ``endpoints`` and any other of its fields
    (``retries``, ``health_check``, ``outlier_detection``, ...), routed at ``prefix`` from the gateway
    ``gateway`` listening on 127.0.0.1:``gw_port``."""
    return {
        "services": {service: {"endpoints": [endpoint(e) for e in endpoints], **service_fields}},
        "gateways": {gateway: {"listen": {"address": "127.0.0.1", "port": gw_port},
                               "routes": [{"prefix": prefix, "service": service}]}},
    }


class _Apps(Protocol):
    def address(self, name: str) -> tuple[str, int]: ...


def sidecar_mesh(apps: _Apps, inbound_port: int, calls: Mapping[str, Mapping[str, int]] | None = None, *,
                 services: Iterable[str] = ("productpage", "reviews", "ratings"), trust_domain: str = "example.org",
                 cert_lifetime: str | None = None) -> dict[str, Any]:
    """Services whose instances run a sidecar, each on its own loopback "machine": the app of service
    S listens on ``apps.address(S)`` and S's sidecar takes mesh traffic (mTLS) on the same host at
    ``inbound_port``. ``calls`` maps a caller to the upstreams its app calls and their outbound ports
    on 127.0.0.1: ``{"productpage": {"reviews": 9081}}``."""
    mesh: dict[str, Any] = {"trust_domain": trust_domain}
    if cert_lifetime is not None:
        mesh["cert_lifetime"] = cert_lifetime
    out: dict[str, Any] = {"mesh": mesh, "services": {}}
    for name in services:
        host, port = apps.address(name)
        sidecar: dict[str, Any] = {"inbound": {"address": host, "port": inbound_port}, "app_address": host,
                                   "app_port": port}
        if calls and calls.get(name):
            sidecar["upstreams"] = dict(calls[name])
        out["services"][name] = {"sidecar": sidecar}
    return out
