"""What a generator knows about the Envoy it generates for."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2

from xdsd.node import FetchMode, NodeGroup

# The fetch mode's old name, still used across the generators.
Transport = FetchMode

__all__ = ["NodeGroup", "Transport", "config_source"]


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
