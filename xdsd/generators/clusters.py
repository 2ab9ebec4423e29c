"""CDS: one cluster per service the node routes to."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from xdsd.generators.endpoints import load_assignment, uses_eds
from xdsd.generators.node import NodeGroup, config_source
from xdsd.model import Mesh, Service


def service_cluster(name: str, service: Service, group: NodeGroup) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.connect_timeout.FromNanoseconds(int(service.connect_timeout * 1e9))
    if uses_eds(service):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(config_source(group))
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(load_assignment(name, service))
    if service.protocol == "http2":
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].Pack(opts)
    return cluster


def generate(mesh: Mesh, group: NodeGroup, services: list[str]) -> list[cluster_pb2.Cluster]:
    return [service_cluster(name, mesh.services[name], group) for name in services]
