"""EDS: one ClusterLoadAssignment per service, endpoints grouped by zone, weights carried as
``load_balancing_weight``."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from xdsd.model import Endpoint, Mesh
from xdsd.model.fields import is_ip


def load_assignment(name: str, endpoints: list[Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    by_zone: dict[str, endpoint_components_pb2.LocalityLbEndpoints] = {}
    for ep in endpoints:
        zone = ep.zone or ""
        locality = by_zone.get(zone)
        if locality is None:
            locality = cla.endpoints.add()
            if zone:
                locality.locality.zone = zone
            by_zone[zone] = locality
        lb = locality.lb_endpoints.add()
        sock = lb.endpoint.address.socket_address
        sock.address = ep.address
        sock.port_value = ep.port
        lb.load_balancing_weight.value = ep.weight
        if ep.status == "draining":
            lb.health_status = health_check_pb2.DRAINING
    return cla


def uses_eds(endpoints: list[Endpoint]) -> bool:
    """EDS carries IP addresses only; a service with host names becomes a STRICT_DNS cluster."""
    return all(is_ip(ep.address) for ep in endpoints)


def generate(mesh: Mesh, services: list[str]) -> list[endpoint_pb2.ClusterLoadAssignment]:
    out = []
    for name in services:
        endpoints = mesh.endpoints_of(name)
        if uses_eds(endpoints):
            out.append(load_assignment(name, endpoints))
    return out
