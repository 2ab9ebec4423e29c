"""Snapshots per key (node group), rebuilt on each revision; wakes the watchers whose resources
changed. The cache knows neither the protocol nor the mesh: a revision's input is opaque to it, and a
generator (``inputs.Generator``) says what each key holds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

from xdsd.cache.inputs import Generated, Generator
from xdsd.cache.snapshot import Encoder, InconsistentSnapshot, Snapshot

log = logging.getLogger(__name__)

Watcher = Callable[[Snapshot, set[str]], None]
# Told when its key's snapshot cannot be built (the group's streams end; others are served).
FailureWatcher = Callable[[Exception], None]


class GroupFailed(Exception):
    """A key's (node group's) resources could not be generated: its watchers are not served."""


class _Calls:
    """A plain function ``(input, key) -> resources`` as a Generator (tests, one-off uses)."""

    def __init__(self, fn: Callable[[object, Hashable], Generated]) -> None:
        self._fn = fn
        self._input: object = None

    def begin(self, revision: object, hint: object = None) -> None:
        self._input = revision

    def generate(self, key: Hashable) -> Generated:
        return self._fn(self._input, key)

    def end(self) -> None:
        pass


class SnapshotCache:
    def __init__(self, generator: Generator | Callable[[object, Hashable], Generated]) -> None:
        self.generator: Generator = generator if hasattr(generator, "begin") else _Calls(generator)  # type: ignore[arg-type]
        self._input: object = None
        self._ready = False
        self.revision = 0
        self._snapshots: dict[Hashable, Snapshot] = {}
        self._watchers: dict[Hashable, set[Watcher]] = {}
        self._failure_watchers: dict[Watcher, FailureWatcher] = {}
        # Keys whose last build failed, and why (fault isolation: the revision goes on without them).
        self.failed: dict[Hashable, str] = {}
        self.on_group_failure: Callable[[Hashable, Exception], None] = lambda key, exc: None
        self._encoder = Encoder()
        self.last_build_seconds = 0.0  # of the last update, up to the snapshots being ready

    @property
    def ready(self) -> bool:
        """False until the first revision is set: nothing is served before that."""
        return self._ready

    @property
    def input(self) -> object:
        """The input of the revision being served (what ``update`` was last given)."""
        return self._input

    @property
    def memo(self) -> object:
        """The generator's memo, if it has one (tests look at its hits and misses)."""
        return getattr(self.generator, "memo", None)

    def _build(self, key: Hashable, revision: int) -> Snapshot:
        return Snapshot.build(key, revision, self.generator.generate(key), self._encoder,  # type: ignore[arg-type]
                              self._snapshots.get(key))

    def update(self, revision_input: object, hint: object = None) -> dict[Hashable, set[str]]:
        """Rebuild every watched key for a new revision. A key whose generation raises is not
        served (its watchers are told, its snapshot dropped); the others get the new revision. An
        inconsistent snapshot (a generator bug) fails the whole revision. ``hint`` goes to the
        generator (what changed since the last revision). Returns the changed types per key
        (watchers already woken)."""
        started = time.perf_counter()
        revision = self.revision + 1
        fresh: dict[Hashable, Snapshot] = {}
        broken: dict[Hashable, Exception] = {}
        self.generator.begin(revision_input, hint)
        try:
            for key in self._watchers:
                try:
                    fresh[key] = self._build(key, revision)
                except InconsistentSnapshot:
                    raise
                except Exception as exc:  # noqa: BLE001 - one key's failure is that key's, not the revision's
                    broken[key] = exc
        finally:
            self.generator.end()
        self._encoder.sweep()
        self._input = revision_input
        self._ready = True
        self.revision = revision
        # The new snapshots are ready (generated, serialized, checked); what follows is the fan-out.
        self.last_build_seconds = time.perf_counter() - started
        changed: dict[Hashable, set[str]] = {}
        for key, exc in broken.items():
            self._fail(key, exc)
        for key, snap in fresh.items():
            self.failed.pop(key, None)
            types = snap.changed_types(self._snapshots.get(key))
            if not types:
                continue  # keep the old snapshot object: identical content, nothing to wake
            self._snapshots[key] = snap
            changed[key] = types
            for watcher in list(self._watchers.get(key, ())):
                watcher(snap, types)
        return changed

    def current(self, key: Hashable) -> Snapshot | None:
        """The key's snapshot if one is built (``snapshot`` builds a missing one)."""
        return self._snapshots.get(key)

    def snapshot(self, key: Hashable) -> Snapshot | None:
        """The key's snapshot, built now if missing. Raises GroupFailed if it cannot be built."""
        snap = self._snapshots.get(key)
        if snap is None and self._ready:
            try:
                snap = self._build(key, self.revision)
            except Exception as exc:  # noqa: BLE001 - reported to the key's watchers, not the caller's loop
                self._fail(key, exc)
                raise GroupFailed(self.failed[key]) from exc
            self._snapshots[key] = snap
            self.failed.pop(key, None)
        return snap

    def _fail(self, key: Hashable, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.failed[key] = text[:500]
        log.error("cannot generate the resources of node group %s: %s", key, text, exc_info=exc)
        self._snapshots.pop(key, None)
        self.on_group_failure(key, exc)
        for watcher in list(self._watchers.get(key, ())):
            on_failure = self._failure_watchers.get(watcher)
            if on_failure is not None:
                on_failure(exc)

    def watch(self, key: Hashable, watcher: Watcher, on_failure: FailureWatcher | None = None) -> None:
        self._watchers.setdefault(key, set()).add(watcher)
        if on_failure is not None:
            self._failure_watchers[watcher] = on_failure

    def unwatch(self, key: Hashable, watcher: Watcher) -> None:
        self._failure_watchers.pop(watcher, None)
        watchers = self._watchers.get(key)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self._watchers[key]
            self._snapshots.pop(key, None)
            self.failed.pop(key, None)

    def groups(self) -> dict[Hashable, int]:
        return {k: len(w) for k, w in self._watchers.items()}
