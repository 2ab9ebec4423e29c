"""Who a connected proxy is: its node group, how it fetches, and the ``xdsd.*`` node-metadata keys
that ``xdsd bootstrap`` writes and the server reads. A leaf module: it imports nothing from xdsd,
so the server, the cache and the generators can all depend on it.

Everything here comes from the network (a node's first request): ``NodeGroup.from_node`` checks
every field it takes, to the key, before anything is built from it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

XDS_CLUSTER = "xds_cluster"  # the bootstrap's static cluster for xdsd (ADS, SDS, ext_authz over gRPC)

# Node metadata keys (``node.metadata``), written by ``xdsd bootstrap``.
META_XDS_CLUSTER = "xdsd.xds_cluster"  # the bootstrap cluster that reaches xdsd, if not XDS_CLUSTER
META_INBOUND_ADDRESS = "xdsd.inbound_address"  # sidecars: the instance's mesh address
META_APP_ADDRESS = "xdsd.app_address"  # sidecars: where the instance's app listens
META_ADMIN_ADDRESS = "xdsd.admin_address"  # the Envoy's admin interface, HOST:PORT (telemetry.stats)
META_AUTHZ_CLUSTER = "xdsd.authz_cluster"  # the bootstrap cluster for ext_authz over HTTP
META_KEYS = (META_XDS_CLUSTER, META_INBOUND_ADDRESS, META_APP_ADDRESS, META_ADMIN_ADDRESS, META_AUTHZ_CLUSTER)

MAX_ID = 256  # node.id, node.cluster
MAX_ZONE = 128
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class FetchMode(StrEnum):
    """How the node fetches resources; decides the ConfigSource of the EDS/RDS references."""

    ADS = "ads"  # everything on one aggregated stream (SotW or delta)
    GRPC = "grpc"  # standalone per-type services, state of the world
    DELTA_GRPC = "delta_grpc"  # standalone per-type services, incremental


class NodeError(ValueError):
    """A node's identity or metadata is unusable; the message names the field."""


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """Nodes of one group receive identical resources, generated and serialized once for all of them.

    ``cluster`` is the node's ``node.cluster``: a gateway or service name of the mesh. Which role
    that makes the node is decided by the generators against the current mesh.
    """

    cluster: str
    transport: FetchMode = FetchMode.ADS
    xds_cluster: str = XDS_CLUSTER
    # A sidecar instance may say where its inbound listener binds (node metadata), when the
    # service's config leaves the address open.
    inbound_address: str | None = None
    app_address: str | None = None  # likewise for where the app listens (several instances on one host)
    # Standalone (non-ADS) nodes open more streams from config sources we generate; those must carry
    # the node's credentials too, so its gRPC metadata is copied into them (such groups are per node).
    initial_metadata: tuple[tuple[str, str], ...] = ()
    # The node's own zone (node.locality.zone): endpoints there get priority 0, others priority 1.
    zone: str | None = None
    # Where the node's admin interface listens, HOST:PORT (node metadata ``xdsd.admin_address``,
    # written by ``xdsd bootstrap``); the stats listener forwards /stats/prometheus there.
    admin_address: str | None = None
    # The bootstrap's cluster for xdsd's ext_authz over HTTP (node metadata ``xdsd.authz_cluster``,
    # written by ``xdsd bootstrap --authz-http-port``); None: checks go over gRPC on the xDS cluster.
    authz_cluster: str | None = None
    # During a staged rollout, the canary nodes of a group form a group of their own that is served
    # the new revision (the others keep the previous one).
    canary: bool = False
    # Groups are dict keys everywhere (cache, memo): hash the fields once, not on every lookup.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((
            self.cluster, self.transport, self.xds_cluster, self.inbound_address, self.app_address,
            self.initial_metadata, self.zone, self.admin_address, self.authz_cluster, self.canary)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.cluster}/{self.transport}" + (" (canary)" if self.canary else "")

    @classmethod
    def from_node(cls, node: Any, fetch: FetchMode, carried: tuple[tuple[str, str], ...] = ()) -> NodeGroup:
        """The group of an ``envoy.config.core.v3.Node``, after checking every field it uses.
        Raises NodeError naming the first bad field."""
        _text("node.id", node.id, MAX_ID, required=True)
        _text("node.cluster", node.cluster, MAX_ID)
        zone = _text("node.locality.zone", node.locality.zone, MAX_ZONE) or None
        meta = _metadata(node.metadata.fields)
        xds_cluster = meta.get(META_XDS_CLUSTER) or XDS_CLUSTER
        authz = meta.get(META_AUTHZ_CLUSTER) or None
        for key, value in ((META_XDS_CLUSTER, xds_cluster), (META_AUTHZ_CLUSTER, authz)):
            if value is not None and not _CLUSTER_NAME.fullmatch(value):
                raise NodeError(f"node.metadata.{key}: must be 1-128 of A-Z a-z 0-9 _ . -, got {value[:80]!r}")
        inbound = _ip(META_INBOUND_ADDRESS, meta.get(META_INBOUND_ADDRESS))
        app = _ip(META_APP_ADDRESS, meta.get(META_APP_ADDRESS))
        admin = _host_port(META_ADMIN_ADDRESS, meta.get(META_ADMIN_ADDRESS))
        return cls(cluster=node.cluster, transport=fetch, xds_cluster=xds_cluster, inbound_address=inbound,
                   app_address=app, initial_metadata=carried, zone=zone, admin_address=admin, authz_cluster=authz)


def _text(name: str, value: str, limit: int, required: bool = False) -> str:
    if required and not value:
        raise NodeError(f"{name}: required")
    if len(value) > limit:
        raise NodeError(f"{name}: at most {limit} characters, got {len(value)}")
    if not value.isprintable():
        raise NodeError(f"{name}: control characters are not allowed")
    return value


def _metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    """The ``xdsd.*`` keys of the node metadata: known keys only, string values only."""
    out: dict[str, str] = {}
    for key in fields:
        if not key.startswith("xdsd."):
            continue  # the node's own metadata: not read
        if key not in META_KEYS:
            raise NodeError(f"node.metadata.{key[:80]}: unknown xdsd key (known: {', '.join(META_KEYS)})")
        value = fields[key]
        if value.WhichOneof("kind") != "string_value":
            raise NodeError(f"node.metadata.{key}: must be a string")
        out[key] = value.string_value
    return out


def _ip(key: str, value: str | None) -> str | None:
    if not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        ip = None
    if ip is None or "%" in value:  # no IPv6 zone ids: Envoy would not bind one
        raise NodeError(f"node.metadata.{key}: must be an IP address, got {value[:80]!r}")
    return str(ip)


def _host_port(key: str, value: str | None) -> str | None:
    """``IP:PORT`` or ``[IPv6]:PORT``."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host) if "%" not in host else None
        number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else -1
    except ValueError:
        ip, number = None, -1
    if not sep or ip is None or not 1 <= number <= 65535:
        raise NodeError(f"node.metadata.{key}: must be IP:PORT, got {value[:80]!r}")
    return f"[{ip}]:{number}" if ip.version == 6 else f"{ip}:{number}"
