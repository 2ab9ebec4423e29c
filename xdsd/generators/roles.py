"""Which role a node plays in the mesh, from its ``node.cluster``."""

from __future__ import annotations

from xdsd.model import Mesh

GATEWAY = "gateway"
SIDECAR = "sidecar"
UNKNOWN = "unknown"


def role_of(mesh: Mesh, cluster: str) -> str:
    if cluster in mesh.gateways:
        return GATEWAY
    if cluster in mesh.services:
        return SIDECAR
    return UNKNOWN
