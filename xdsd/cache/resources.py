"""Immutable, serialized-once resources and per-type snapshots.

A resource is serialized exactly once, when its snapshot is built. What streams send are byte
strings assembled from these pieces, so a thousand proxies of one role cost one serialization.
Versions are hashes of the serialized bytes: two xdsd replicas given the same mesh agree on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message


def content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    type_url: str
    version: str
    body: bytes  # the resource message, serialized (deterministically)
    sotw_field: bytes  # this resource as one encoded ``DiscoveryResponse.resources`` entry
    delta_field: bytes  # this resource as one encoded ``DeltaDiscoveryResponse.resources`` entry

    @classmethod
    def from_message(cls, name: str, message: Message) -> Resource:
        body = message.SerializeToString(deterministic=True)
        type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
        version = content_version(body)
        packed = any_pb2.Any(type_url=type_url, value=body)
        sotw_field = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
        delta = discovery_pb2.Resource(name=name, version=version)
        delta.resource.CopyFrom(packed)
        delta_field = discovery_pb2.DeltaDiscoveryResponse(resources=[delta]).SerializeToString()
        return cls(name, type_url, version, body, sotw_field, delta_field)


_EMPTY: Mapping[str, Resource] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one type for one node group; ``version`` changes iff any resource does."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]
    # For clusters: names of the clusters whose endpoints come from EDS (make-before-break gate).
    eds_names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, type_url: str, resources: Iterable[Resource], eds_names: frozenset[str] = frozenset(),
              previous: TypeSnapshot | None = None) -> TypeSnapshot:
        """``previous`` (the group's last snapshot of this type) is returned as is when it holds the
        very same resources: most types of most groups do not change in a revision."""
        by_name: dict[str, Resource] = {}
        for r in resources:
            if r.name in by_name:
                raise ValueError(f"duplicate {type_url.rsplit('.', 1)[-1]} resource name {r.name!r}")
            by_name[r.name] = r
        if (
            previous is not None
            and previous.eds_names == eds_names
            and len(previous.resources) == len(by_name)
            and all(previous.resources.get(n) is r for n, r in by_name.items())
        ):
            return previous
        digest = hashlib.sha256()
        for name in sorted(by_name):
            digest.update(name.encode())
            digest.update(b"\0")
            digest.update(by_name[name].version.encode())
            digest.update(b"\0")
        version = digest.hexdigest()[:16] if by_name else "empty"
        return cls(type_url, version, MappingProxyType(by_name), eds_names)

    @classmethod
    def empty(cls, type_url: str) -> TypeSnapshot:
        return cls(type_url, "empty", _EMPTY)
