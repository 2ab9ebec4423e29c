"""CDS: one cluster per service the node routes to, plus a sidecar's local app cluster."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from xdsd.ca import service_id
from xdsd.generators.endpoints import load_assignment, uses_eds
from xdsd.generators.node import NodeGroup, config_source
from xdsd.generators.tls import upstream_socket
from xdsd.model import Mesh


def service_cluster(mesh: Mesh, name: str, group: NodeGroup, own_id: str | None) -> cluster_pb2.Cluster:
    """A cluster for service ``name``. If the service runs sidecars and the caller has an identity
    (``own_id``), traffic goes over mTLS and only the service's own SPIFFE ID is accepted."""
    service = mesh.services[name]
    endpoints = mesh.endpoints_of(name)
    cluster = cluster_pb2.Cluster(name=name, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.connect_timeout.FromNanoseconds(int(service.connect_timeout * 1e9))
    if uses_eds(endpoints):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(config_source(group))
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(load_assignment(name, endpoints))
    if service.sidecar is not None and own_id is not None:
        td = mesh.mesh.trust_domain
        cluster.transport_socket.CopyFrom(upstream_socket(group, own_id, td, service_id(td, name)))
    if service.protocol == "http2":
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    return cluster


def local_app_cluster(name: str, address: str, port: int, protocol: str) -> cluster_pb2.Cluster:
    """The app next to the sidecar, in plaintext on the machine itself."""
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.FromSeconds(1)
    lb = cluster.load_assignment.endpoints.add().lb_endpoints.add()
    cluster.load_assignment.cluster_name = name
    sock = lb.endpoint.address.socket_address
    sock.address = "127.0.0.1" if address == "0.0.0.0" else address
    sock.port_value = port
    if protocol == "http2":
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    return cluster


def generate(mesh: Mesh, group: NodeGroup, services: list[str], own_id: str | None) -> list[cluster_pb2.Cluster]:
    return [service_cluster(mesh, name, group, own_id) for name in services]
