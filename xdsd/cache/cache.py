"""Snapshots per node group, regenerated on each mesh revision; wakes the streams whose
resources changed. The cache knows neither the protocol nor the mesh's meaning: it calls a
generator and hands out snapshots."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from google.protobuf.message import Message

from xdsd.cache.snapshot import Encoder, Snapshot
from xdsd.generators import Memo, NodeGroup
from xdsd.model import Mesh

log = logging.getLogger(__name__)

Generator = Callable[[Mesh, NodeGroup], dict[str, list[Message]]]
Watcher = Callable[[Snapshot, set[str]], None]


class SnapshotCache:
    def __init__(self, generator: Generator) -> None:
        self._generate = generator
        self._mesh: Mesh | None = None
        self.revision = 0
        self._snapshots: dict[NodeGroup, Snapshot] = {}
        self._watchers: dict[NodeGroup, set[Watcher]] = {}
        # Shared by all groups: per-service resources are generated and serialized once (a
        # generator that takes a ``memo`` argument should be given this one).
        self.memo = Memo()
        self._encoder = Encoder()
        self.last_build_seconds = 0.0  # of the last set_mesh, up to the snapshots being ready

    @property
    def ready(self) -> bool:
        """False until the first complete mesh is set: nothing is served before that."""
        return self._mesh is not None

    @property
    def mesh(self) -> Mesh | None:
        return self._mesh

    def _build(self, mesh: Mesh, group: NodeGroup, revision: int) -> Snapshot:
        return Snapshot.build(group, revision, self._generate(mesh, group), self._encoder, self._snapshots.get(group))

    def set_mesh(self, mesh: Mesh, endpoints_changed: tuple[Mesh, frozenset[str]] | None = None) -> dict[NodeGroup, set[str]]:
        """Regenerate every watched group. All or nothing: if one group fails, nothing changes and
        the error propagates. Returns the changed types per group (watchers already woken).

        ``endpoints_changed``: ``(base, services)`` when ``mesh`` is ``base`` with new endpoints for
        ``services`` and nothing else changed (a registration). If ``base`` is the mesh served now,
        the generator may patch what it built last time (generators.memo) instead of regenerating."""
        started = time.perf_counter()
        revision = self.revision + 1
        partial = endpoints_changed is not None and self._mesh is not None and endpoints_changed[0] is self._mesh
        self.memo.endpoints_changed = endpoints_changed if partial else None
        try:
            fresh = {group: self._build(mesh, group, revision) for group in self._watchers}
        finally:
            self.memo.endpoints_changed = None
        # A patched revision uses (touches) only what the changed services feed: keep the rest.
        self.memo.sweep(partial=partial)
        self._encoder.sweep()
        self._mesh = mesh
        self.revision = revision
        # The new snapshots are ready (generated, serialized, checked); what follows is the fan-out.
        self.last_build_seconds = time.perf_counter() - started
        changed: dict[NodeGroup, set[str]] = {}
        for group, snap in fresh.items():
            types = snap.changed_types(self._snapshots.get(group))
            if not types:
                continue  # keep the old snapshot object: identical content, nothing to wake
            self._snapshots[group] = snap
            changed[group] = types
            for watcher in list(self._watchers.get(group, ())):
                watcher(snap, types)
        return changed

    def current(self, group: NodeGroup) -> Snapshot | None:
        """The group's snapshot if one is built (``snapshot`` builds a missing one)."""
        return self._snapshots.get(group)

    def snapshot(self, group: NodeGroup) -> Snapshot | None:
        snap = self._snapshots.get(group)
        if snap is None and self._mesh is not None:
            snap = self._build(self._mesh, group, self.revision)
            self._snapshots[group] = snap
        return snap

    def watch(self, group: NodeGroup, watcher: Watcher) -> None:
        self._watchers.setdefault(group, set()).add(watcher)

    def unwatch(self, group: NodeGroup, watcher: Watcher) -> None:
        watchers = self._watchers.get(group)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._watchers[group]
            self._snapshots.pop(group, None)

    def groups(self) -> dict[NodeGroup, int]:
        return {g: len(w) for g, w in self._watchers.items()}
