"""xdsd: an xDS control plane and Envoy extension service for meshes of plain machines and VMs."""

from __future__ import annotations

__version__ = "0.1.0"
