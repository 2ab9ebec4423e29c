"""Pure generators: ``(Mesh, NodeGroup, Credentials) -> resources``, one module per resource type,
no I/O. Which node gets what is decided here."""

from __future__ import annotations

from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.ca import Credentials, gateway_id, service_id
from xdsd.generators import clusters, endpoints, listeners, routes, secrets
from xdsd.generators.node import NodeGroup, Transport
from xdsd.generators.roles import GATEWAY, SIDECAR, role_of
from xdsd.model import Mesh

__all__ = ["NodeGroup", "Transport", "generate", "required_identities"]

_NO_CREDENTIALS = Credentials()


def required_identities(mesh: Mesh) -> set[str]:
    """Every SPIFFE ID the CA must hold an SVID for: services with sidecars, and gateways that call
    them over mTLS."""
    td = mesh.mesh.trust_domain
    ids = {service_id(td, name) for name, svc in mesh.services.items() if svc.sidecar is not None}
    for name, gw in mesh.gateways.items():
        if any(mesh.services[r.service].sidecar is not None for r in gw.routes):
            ids.add(gateway_id(td, name))
    return ids


def generate(mesh: Mesh, group: NodeGroup, credentials: Credentials = _NO_CREDENTIALS) -> dict[str, list[Message]]:
    """Every resource a node of ``group`` should hold, by type URL."""
    out: dict[str, list[Message]] = {t: [] for t in typeurls.PUSH_ORDER}
    role = role_of(mesh, group.cluster)
    if role == GATEWAY:
        _gateway(mesh, group, credentials, out)
    elif role == SIDECAR and mesh.services[group.cluster].sidecar is not None:
        _sidecar(mesh, group, credentials, out)
    return out


def _gateway(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]]) -> None:
    gateway = mesh.gateways[group.cluster]
    services = sorted({r.service for r in gateway.routes})
    own_id = gateway_id(mesh.mesh.trust_domain, group.cluster)
    if own_id not in required_identities(mesh):
        own_id = None  # type: ignore[assignment]
    out[typeurls.CLUSTER] = list(clusters.generate(mesh, group, services, own_id))
    out[typeurls.ENDPOINT] = list(endpoints.generate(mesh, services))
    out[typeurls.LISTENER] = [listeners.gateway_listener(group.cluster, gateway, group)]
    out[typeurls.ROUTE] = [routes.gateway_routes(group.cluster, gateway, mesh)]
    if own_id is not None:
        out[typeurls.SECRET] = list(secrets.generate(credentials, own_id))


def _sidecar(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]]) -> None:
    name = group.cluster
    service = mesh.services[name]
    sidecar = service.sidecar
    assert sidecar is not None
    td = mesh.mesh.trust_domain
    own_id = service_id(td, name)
    upstreams = sorted(sidecar.upstreams)
    app_cluster = f"inbound|{sidecar.app_port}|{name}"
    out[typeurls.CLUSTER] = [
        clusters.local_app_cluster(app_cluster, group.app_address or sidecar.app_address, sidecar.app_port, service.protocol),
        *clusters.generate(mesh, group, upstreams, own_id),
    ]
    out[typeurls.ENDPOINT] = list(endpoints.generate(mesh, upstreams))
    inbound_address = group.inbound_address or sidecar.inbound.address
    out[typeurls.LISTENER] = [
        listeners.inbound_listener(name, inbound_address, sidecar.inbound.port,
                                   routes.inbound_routes(name, app_cluster), group, own_id, td),
        *(
            listeners.outbound_listener(u, sidecar.upstreams[u], routes.outbound_route_name(u), group)
            for u in upstreams
        ),
    ]
    out[typeurls.ROUTE] = [routes.outbound_routes(u, mesh) for u in upstreams]
    out[typeurls.SECRET] = list(secrets.generate(credentials, own_id))
