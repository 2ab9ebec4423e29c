"""Immutable, serialized-once resources and per-type snapshots.

A resource is serialized exactly once, when its snapshot is built. What streams send are byte
strings assembled from these pieces, so a thousand proxies of one role cost one serialization.
Versions are hashes of the serialized bytes: two xdsd replicas given the same mesh agree on them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from xdsd import wire


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
    mix: int = 0  # hash of (name, version): a type's version is the sum of its resources' mixes

    @classmethod
    def from_message(cls, name: str, message: Message) -> Resource:
        body = message.SerializeToString(deterministic=True)
        type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
        return cls.from_body(name, type_url, body, content_version(body))

    @classmethod
    def from_body(cls, name: str, type_url: str, body: bytes, version: str) -> Resource:
        """Wraps serialized bytes by concatenation (no parse, one copy per form):
        ``Any{type_url=1, value=2}``, ``DiscoveryResponse.resources=2``,
        ``Resource{name=3, version=1, resource=2}`` in ``DeltaDiscoveryResponse.resources=2``."""
        # Joined from their pieces: the body is copied once per form. (Large assignments are
        # hundreds of KB; every extra copy is a fresh allocation the allocator may page in again.)
        type_field = wire.field(1, type_url.encode())
        value_head = wire.head(2, len(body))
        packed_size = len(type_field) + len(value_head) + len(body)  # Any{type_url=1, value=2}
        packed_head = wire.head(2, packed_size)
        sotw_field = b"".join((packed_head, type_field, value_head, body))
        version_field = wire.field(1, version.encode())
        name_field = wire.field(3, name.encode())
        delta_size = len(version_field) + len(packed_head) + packed_size + len(name_field)
        delta_field = b"".join((wire.head(2, delta_size), version_field, packed_head, type_field, value_head, body, name_field))
        mix = int.from_bytes(hashlib.sha256(f"{name}\0{version}".encode()).digest()[:16], "big")
        return cls(name, type_url, version, body, sotw_field, delta_field, mix)


_EMPTY: Mapping[str, Resource] = MappingProxyType({})


_MASK = (1 << 128) - 1


@dataclass(frozen=True, slots=True, weakref_slot=True)
class TypeSnapshot:
    """All resources of one type for one node group; ``version`` changes iff any resource does.

    The version is the sum (mod 2^128) of the resources' (name, version) hashes: independent of
    order, the same on every replica, and updated in O(changes) when one resource of thousands
    changes."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]
    # For clusters: names of the clusters whose endpoints come from EDS (make-before-break gate).
    eds_names: frozenset[str] = field(default_factory=frozenset)
    total: int = 0
    # A patched snapshot knows what it was patched from (weakly: no chain of old snapshots is kept
    # alive) and the names whose resource differs from it (added, replaced or removed): a client
    # known to be up to date with the parent needs only those looked at.
    parent: weakref.ref[TypeSnapshot] | None = field(default=None, compare=False, repr=False)
    diff: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def since(self, other: TypeSnapshot | None) -> frozenset[str] | None:
        """The names that may differ from ``other`` if this snapshot was patched from it, else None."""
        if other is self:
            return frozenset()
        parent = self.parent
        if other is None or parent is None or parent() is not other:
            return None
        return self.diff

    @classmethod
    def build(cls, type_url: str, resources: Iterable[Resource], eds_names: frozenset[str] = frozenset(),
              previous: TypeSnapshot | None = None) -> TypeSnapshot:
        """``previous`` (the group's last snapshot of this type) is returned as is when it holds the
        very same resources: most types of most groups do not change in a revision."""
        by_name: dict[str, Resource] = {}
        for r in resources:
            if r.name in by_name:
                raise ValueError(f"duplicate {_short(type_url)} resource name {r.name!r}")
            by_name[r.name] = r
        if (
            previous is not None
            and (previous.eds_names is eds_names or previous.eds_names == eds_names)
            and len(previous.resources) == len(by_name)
            and all(previous.resources.get(n) is r for n, r in by_name.items())
        ):
            return previous
        total = sum(r.mix for r in by_name.values()) & _MASK
        return cls._make(type_url, by_name, eds_names, total)

    def patch(self, removed: Iterable[Resource], added: Iterable[Resource], eds_names: frozenset[str]) -> TypeSnapshot:
        """This snapshot with some resources replaced: O(changes) but for one dict copy."""
        by_name = self.resources.copy()  # type: ignore[attr-defined]  # a C-level copy of the dict behind the proxy
        total = self.total
        diff = set()
        for r in removed:
            if by_name.get(r.name) is r:
                del by_name[r.name]
                total -= r.mix
                diff.add(r.name)
        for r in added:
            if r.name in by_name:
                raise ValueError(f"duplicate {_short(self.type_url)} resource name {r.name!r}")
            by_name[r.name] = r
            total += r.mix
            diff.add(r.name)
        return self._make(self.type_url, by_name, eds_names, total & _MASK, weakref.ref(self), frozenset(diff))

    @classmethod
    def _make(cls, type_url: str, by_name: dict[str, Resource], eds_names: frozenset[str], total: int,
              parent: weakref.ref[TypeSnapshot] | None = None, diff: frozenset[str] = frozenset()) -> TypeSnapshot:
        version = f"{total:032x}"[:16] if by_name else "empty"
        return cls(type_url, version, MappingProxyType(by_name), eds_names, total, parent, diff)

    @classmethod
    def empty(cls, type_url: str) -> TypeSnapshot:
        return cls(type_url, "empty", _EMPTY)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
