"""Pure generators: ``(Mesh, NodeGroup, Credentials) -> resources``, one module per resource type,
no I/O. Which node gets what is decided in ``assemble``; ``reuse`` and ``patch`` keep the work per
revision proportional to what changed."""

from __future__ import annotations

from xdsd.generators.assemble import generate, required_identities
from xdsd.generators.memo import Memo
from xdsd.generators.node import NodeGroup, Transport
from xdsd.generators.revision import MeshGenerator, MeshRevision

__all__ = ["Memo", "MeshGenerator", "MeshRevision", "NodeGroup", "Transport", "generate", "required_identities"]
