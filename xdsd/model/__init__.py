"""The typed, validated mesh: the only shape of desired state the rest of xdsd sees."""

from __future__ import annotations

from xdsd.model.load import load_mesh, load_mesh_file, parse_mesh
from xdsd.model.mesh import (
    Endpoint,
    Gateway,
    GatewayRoute,
    Inbound,
    Listen,
    Mesh,
    MeshSettings,
    Service,
    Sidecar,
)

__all__ = [
    "Endpoint",
    "Gateway",
    "GatewayRoute",
    "Inbound",
    "MeshSettings",
    "Sidecar",
    "Listen",
    "Mesh",
    "Service",
    "load_mesh",
    "load_mesh_file",
    "parse_mesh",
]
