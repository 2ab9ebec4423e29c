"""Immutable snapshots per node group, serialized once, versioned by content."""

from __future__ import annotations

from xdsd.cache.cache import SnapshotCache
from xdsd.cache.resources import Resource, TypeSnapshot
from xdsd.cache.snapshot import InconsistentSnapshot, Snapshot

__all__ = ["InconsistentSnapshot", "Resource", "Snapshot", "SnapshotCache", "TypeSnapshot"]
