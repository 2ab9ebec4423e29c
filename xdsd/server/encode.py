"""Responses as bytes, assembled from resources serialized once (see cache.resources).

Protobuf's wire format lets a message be the concatenation of its fields, so a response is its
small header (version, type, nonce) followed by the pre-encoded resource entries."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xdsd.cache import Resource

_CONTROL_PLANE = base_pb2.ControlPlane(identifier="xdsd")


def sotw_response(version: str, type_url: str, nonce: str, resources: Iterable[Resource]) -> bytes:
    head = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=type_url, nonce=nonce, control_plane=_CONTROL_PLANE
    ).SerializeToString()
    return b"".join([head, *(r.sotw_field for r in resources)])  # one copy of large resources, not two


def delta_response(
    system_version: str, type_url: str, nonce: str, resources: Iterable[Resource], removed: Iterable[str]
) -> bytes:
    head = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=system_version,
        type_url=type_url,
        nonce=nonce,
        removed_resources=list(removed),
        control_plane=_CONTROL_PLANE,
    ).SerializeToString()
    return b"".join([head, *(r.delta_field for r in resources)])
