"""Snapshots per node group, regenerated on each mesh revision; wakes the streams whose
resources changed. The cache knows neither the protocol nor the mesh's meaning: it calls a
generator and hands out snapshots."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from google.protobuf.message import Message

from xdsd.cache.snapshot import Encoder, InconsistentSnapshot, Snapshot
from xdsd.generators import Memo, NodeGroup
from xdsd.model import Mesh

log = logging.getLogger(__name__)

Generator = Callable[[Mesh, NodeGroup], dict[str, list[Message]]]
Watcher = Callable[[Snapshot, set[str]], None]
# Told when its group's snapshot cannot be built (the group's streams end; others are served).
FailureWatcher = Callable[[Exception], None]


class GroupFailed(Exception):
    """A node group's resources could not be generated (the group's nodes are not served)."""


class SnapshotCache:
    def __init__(self, generator: Generator) -> None:
        self._generate = generator
        self._mesh: Mesh | None = None
        self._canary: Mesh | None = None
        self.revision = 0
        self._snapshots: dict[NodeGroup, Snapshot] = {}
        self._watchers: dict[NodeGroup, set[Watcher]] = {}
        self._failure_watchers: dict[Watcher, FailureWatcher] = {}
        # Groups whose last build failed, and why (fault isolation: the revision goes on without them).
        self.failed: dict[NodeGroup, str] = {}
        self.on_group_failure: Callable[[NodeGroup, Exception], None] = lambda group, exc: None
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

    @property
    def canary_mesh(self) -> Mesh | None:
        """During a staged rollout: the mesh canary groups are served (the others get ``mesh``)."""
        return self._canary

    def _build(self, mesh: Mesh, group: NodeGroup, revision: int) -> Snapshot:
        if group.canary and self._canary is not None:
            mesh = self._canary
        return Snapshot.build(group, revision, self._generate(mesh, group), self._encoder, self._snapshots.get(group))

    def set_mesh(self, mesh: Mesh, endpoints_changed: tuple[Mesh, frozenset[str]] | None = None,
                 canary: Mesh | None = None) -> dict[NodeGroup, set[str]]:
        """Regenerate every watched group. A group whose generation raises is not served (its
        watchers are told, its snapshot dropped); the others get the new revision. An inconsistent
        snapshot (InconsistentSnapshot: a generator bug visible in every group) still fails the
        whole revision. Returns the changed types per group (watchers already woken).

        ``endpoints_changed``: ``(base, services)`` when ``mesh`` is ``base`` with new endpoints for
        ``services`` and nothing else changed (a registration). If ``base`` is the mesh served now,
        the generator may patch what it built last time (generators.memo) instead of regenerating.

        ``canary``: during a staged rollout, the mesh that groups marked ``canary`` are built from."""
        started = time.perf_counter()
        self._canary = canary
        revision = self.revision + 1
        partial = endpoints_changed is not None and self._mesh is not None and endpoints_changed[0] is self._mesh
        self.memo.endpoints_changed = endpoints_changed if partial else None
        fresh: dict[NodeGroup, Snapshot] = {}
        broken: dict[NodeGroup, Exception] = {}
        try:
            for group in self._watchers:
                try:
                    fresh[group] = self._build(mesh, group, revision)
                except InconsistentSnapshot:
                    raise
                except Exception as exc:  # noqa: BLE001 - one group's failure is that group's, not the revision's
                    broken[group] = exc
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
        for group, exc in broken.items():
            self._fail(group, exc)
        for group, snap in fresh.items():
            self.failed.pop(group, None)
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
        """The group's snapshot, built now if missing. Raises GroupFailed if it cannot be built."""
        snap = self._snapshots.get(group)
        if snap is None and self._mesh is not None:
            try:
                snap = self._build(self._mesh, group, self.revision)
            except Exception as exc:  # noqa: BLE001 - reported to the group's streams, not the caller's loop
                self._fail(group, exc)
                raise GroupFailed(self.failed[group]) from exc
            self._snapshots[group] = snap
            self.failed.pop(group, None)
        return snap

    def _fail(self, group: NodeGroup, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.failed[group] = text[:500]
        log.error("cannot generate the resources of node group %s: %s", group, text, exc_info=exc)
        self._snapshots.pop(group, None)
        self.on_group_failure(group, exc)
        for watcher in list(self._watchers.get(group, ())):
            on_failure = self._failure_watchers.get(watcher)
            if on_failure is not None:
                on_failure(exc)

    def watch(self, group: NodeGroup, watcher: Watcher, on_failure: FailureWatcher | None = None) -> None:
        self._watchers.setdefault(group, set()).add(watcher)
        if on_failure is not None:
            self._failure_watchers[watcher] = on_failure

    def unwatch(self, group: NodeGroup, watcher: Watcher) -> None:
        self._failure_watchers.pop(watcher, None)
        watchers = self._watchers.get(group)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._watchers[group]
            self._snapshots.pop(group, None)
            self.failed.pop(group, None)

    def groups(self) -> dict[NodeGroup, int]:
        return {g: len(w) for g, w in self._watchers.items()}
