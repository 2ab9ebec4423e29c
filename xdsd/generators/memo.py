"""Reuse of generated messages across node groups and revisions.

Generators stay pure: a memoized call returns the message an earlier call built from the very same
input objects (compared with ``is``: the mesh is frozen, and unchanged services keep their objects
from one revision to the next). So a one-endpoint change rebuilds one ClusterLoadAssignment, once,
not once per node group; the cache then skips serializing a message it has already serialized.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from xdsd.cache.inputs import Patched  # noqa: F401 - generators build them; re-exported for their callers
from xdsd.generators.encoded import AssignmentEncoder
from xdsd.model import Mesh

M = TypeVar("M")

_Entry = tuple[tuple[object, ...], object, object]


class Memo:
    def __init__(self) -> None:
        # Large endpoint assignments are encoded incrementally (generators.encoded).
        self.assignments: AssignmentEncoder | None = AssignmentEncoder()
        self._previous: dict[Hashable, _Entry] = {}
        self._current: dict[Hashable, _Entry] = {}
        self.hits = 0
        self.misses = 0
        # Set by the cache for one revision: ``(base, services)`` when the mesh being generated is
        # ``base`` (the last revision's mesh) with new endpoints for ``services`` and nothing else
        # changed. ``generators.generate`` then patches its last output for the group.
        self.endpoints_changed: tuple[Mesh, frozenset[str]] | None = None

    def get(self, key: Hashable, inputs: tuple[object, ...], build: Callable[[], M], equal: object = None) -> M:
        """``build()``'s result for ``key``, built again only if some input is a different object
        (or ``equal`` is no longer equal). ``key`` holds the plain values the result depends on;
        ``inputs`` the model objects; ``equal`` a value compared with ``==`` (e.g. a tuple of
        per-service policy tuples, new objects with the same members when only endpoints changed)."""
        entry = self._current.get(key) or self._previous.get(key)
        if (
            entry is not None
            and len(entry[0]) == len(inputs)
            and all(a is b for a, b in zip(entry[0], inputs, strict=True))
            and entry[2] == equal
        ):
            self._current[key] = entry
            self.hits += 1
            return entry[1]  # type: ignore[return-value]
        message = build()
        self._current[key] = (inputs, message, equal)
        self.misses += 1
        return message

    def last(self, key: Hashable) -> object | None:
        """What ``keep`` stored under ``key`` in this revision or the last one."""
        entry = self._current.get(key) or self._previous.get(key)
        return entry[1] if entry is not None else None

    def keep(self, key: Hashable, value: object) -> None:
        self._current[key] = ((), value, None)

    def sweep(self, partial: bool = False) -> None:
        """Forget what the last revision did not use (call once per revision, after generating).
        ``partial``: the revision patched the last one (``endpoints_changed``) and so did not
        touch what it kept: forget nothing, the next full revision sweeps."""
        if partial:
            self._previous.update(self._current)
            self._current = {}
        else:
            self._previous, self._current = self._current, {}
        if self.assignments is not None:
            self.assignments.sweep(partial)


class NoMemo(Memo):
    """Builds every time, and always as messages (tests, one-off generation)."""

    def __init__(self) -> None:
        super().__init__()
        self.assignments = None

    def get(self, key: Hashable, inputs: tuple[object, ...], build: Callable[[], M], equal: object = None) -> M:
        return build()

    def last(self, key: Hashable) -> object | None:
        return None

    def keep(self, key: Hashable, value: object) -> None:
        pass
