"""Pure generators: ``(Mesh, NodeGroup) -> resources``, one module per resource type, no I/O."""

from __future__ import annotations

from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.generators import clusters, endpoints, listeners, routes
from xdsd.generators.node import NodeGroup, Transport
from xdsd.generators.roles import GATEWAY, role_of
from xdsd.model import Mesh

__all__ = ["NodeGroup", "Transport", "generate"]


def generate(mesh: Mesh, group: NodeGroup) -> dict[str, list[Message]]:
    """Every resource a node of ``group`` should hold, by type URL."""
    out: dict[str, list[Message]] = {t: [] for t in typeurls.PUSH_ORDER[:4]}
    role = role_of(mesh, group.cluster)
    if role == GATEWAY:
        gateway = mesh.gateways[group.cluster]
        services = sorted({r.service for r in gateway.routes})
        out[typeurls.CLUSTER] = list(clusters.generate(mesh, group, services))
        out[typeurls.ENDPOINT] = list(endpoints.generate(mesh, services))
        out[typeurls.LISTENER] = [listeners.gateway_listener(group.cluster, gateway, group)]
        out[typeurls.ROUTE] = [routes.gateway_routes(group.cluster, gateway)]
    return out
