"""EDS: one ClusterLoadAssignment per service, endpoints grouped by zone, weights carried as
``load_balancing_weight``."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from xdsd.model import Mesh, Service


def load_assignment(name: str, service: Service) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    by_zone: dict[str, endpoint_components_pb2.LocalityLbEndpoints] = {}
    for ep in service.endpoints:
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
    return cla


def uses_eds(service: Service) -> bool:
    """EDS carries IP addresses only; a service with host names becomes a STRICT_DNS cluster."""
    from xdsd.model.fields import is_ip

    return all(is_ip(ep.address) for ep in service.endpoints)


def generate(mesh: Mesh, services: list[str]) -> list[endpoint_pb2.ClusterLoadAssignment]:
    return [load_assignment(name, mesh.services[name]) for name in services if uses_eds(mesh.services[name])]
