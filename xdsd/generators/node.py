"""What a generator knows about the Envoy it generates for."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from envoy.config.core.v3 import config_source_pb2

from xdsd.bootstrap import XDS_CLUSTER


class Transport(StrEnum):
    """How the node fetches resources; decides the ConfigSource of the EDS/RDS references."""

    ADS = "ads"  # everything on one aggregated stream (SotW or delta)
    GRPC = "grpc"  # standalone per-type services, state of the world
    DELTA_GRPC = "delta_grpc"  # standalone per-type services, incremental


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """Nodes of one group receive identical resources, generated and serialized once for all of them.

    ``cluster`` is the node's ``node.cluster``: a gateway or service name of the mesh. Which role
    that makes the node is decided by the generators against the current mesh.
    """

    cluster: str
    transport: Transport = Transport.ADS
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
    # Groups are dict keys everywhere (cache, memo): hash the fields once, not on every lookup.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((
            self.cluster, self.transport, self.xds_cluster, self.inbound_address, self.app_address,
            self.initial_metadata, self.zone, self.admin_address, self.authz_cluster)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.cluster}/{self.transport}"


def config_source(group: NodeGroup) -> config_source_pb2.ConfigSource:
    """Where the node fetches resources referenced by other resources (EDS from CDS, RDS from LDS)."""
    cs = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    if group.transport is Transport.ADS:
        cs.ads.SetInParent()
        return cs
    api = cs.api_config_source
    api.api_type = (
        config_source_pb2.ApiConfigSource.DELTA_GRPC
        if group.transport is Transport.DELTA_GRPC
        else config_source_pb2.ApiConfigSource.GRPC
    )
    api.transport_api_version = config_source_pb2.V3
    api.set_node_on_first_message_only = True
    service = api.grpc_services.add()
    service.envoy_grpc.cluster_name = group.xds_cluster
    for key, value in group.initial_metadata:
        service.initial_metadata.add(key=key, value=value)
    return cs
