"""EDS: one ClusterLoadAssignment per cluster (a service, or one subset of it), endpoints grouped by
zone, weights carried as ``load_balancing_weight``."""

from __future__ import annotations

import operator

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from xdsd.generators.encoded import AssignmentEncoder, Encoded, fill_lb_endpoint
from xdsd.model import Endpoint, Mesh
from xdsd.model.fields import is_ip

_ADDRESS = operator.attrgetter("address")

# Subset clusters are named "<service>~<subset>": '~' is never part of a Name (fields.check_name).
SUBSET_SEPARATOR = "~"


def cluster_name(service: str, subset: str | None = None) -> str:
    return service if subset is None else f"{service}{SUBSET_SEPARATOR}{subset}"


def endpoints_of(mesh: Mesh, service: str) -> list[Endpoint]:
    """``mesh.endpoints_of`` without the copy: the service's own (frozen, never mutated) list when it
    has one, so the incremental encoder can tell it is the list it saw a moment ago."""
    endpoints = mesh.services[service].endpoints
    return endpoints if endpoints else mesh.endpoints_of(service)


def endpoints_for(mesh: Mesh, service: str, subset: str | None = None) -> list[Endpoint]:
    """The service's endpoints, or those carrying all of the subset's labels."""
    endpoints = endpoints_of(mesh, service)
    if subset is None:
        return endpoints
    selector = mesh.services[service].subsets[subset]
    return [ep for ep in endpoints if all(ep.labels.get(k) == v for k, v in selector.items())]


def load_assignment(name: str, endpoints: list[Endpoint], zone: str | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    """With the node's ``zone``, that zone's endpoints are priority 0 and all others priority 1:
    Envoy sends everything to priority 0 while it is healthy enough and spills over to 1 as its
    endpoints fail (health checks, outlier ejection). Without a zone, or when no endpoint is in the
    node's zone, everything is priority 0 (priorities must start at 0)."""
    local = zone is not None and any(ep.zone == zone for ep in endpoints)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    by_zone: dict[str, endpoint_components_pb2.LocalityLbEndpoints] = {}
    for ep in endpoints:
        key = ep.zone or ""
        locality = by_zone.get(key)
        if locality is None:
            locality = cla.endpoints.add()
            if key:
                locality.locality.zone = key
            if local and ep.zone != zone:
                locality.priority = 1
            by_zone[key] = locality
        fill_lb_endpoint(locality.lb_endpoints.add(), ep)
    return cla


def uses_eds(endpoints: list[Endpoint]) -> bool:
    """EDS carries IP addresses only; a service with host names becomes a STRICT_DNS cluster."""
    return all(map(is_ip, map(_ADDRESS, endpoints)))  # C-level loops over large services


# From this many endpoints on, an assignment is encoded incrementally to bytes (generators.encoded).
LARGE = 256


def service_assignment(mesh: Mesh, service: str, subset: str | None = None, zone: str | None = None,
                       encoder: AssignmentEncoder | None = None, *,
                       eds: bool) -> endpoint_pb2.ClusterLoadAssignment | Encoded | None:
    """The EDS resource of one cluster of ``service`` (None for a STRICT_DNS service). Depends only
    on the service itself and the node's zone. With an ``encoder``, a large one comes pre-encoded.
    ``eds``: the service's one EDS-or-DNS decision (``uses_eds``, made once per service by the caller)."""
    if not eds:
        return None
    endpoints = endpoints_for(mesh, service, subset)
    if encoder is not None and len(endpoints) >= LARGE:
        return encoder.assignment(cluster_name(service, subset), endpoints, zone, frozen=True)  # model lists
    return load_assignment(cluster_name(service, subset), endpoints, zone)


def generate(mesh: Mesh, services: list[str], zone: str | None = None) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """The whole-service assignments of ``services`` (subsets not included)."""
    return [cla for name in services
            if (cla := service_assignment(mesh, name, None, zone, eds=uses_eds(mesh.endpoints_of(name)))) is not None]
