"""Authorization decisions for Envoy's ext_authz, from the mesh's ``authorization`` policies."""

from __future__ import annotations
