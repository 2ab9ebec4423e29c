"""When is a file's content complete? Decided from what the kernel says about writers, and the clock.

A shell redirect (``generate > mesh.yaml``), ``open(path, "w")`` and editors that save in place
truncate the file and then fill it while it is open; what a reader sees meanwhile is a torn write,
often still valid YAML. A content is taken only once the writer has closed the file (IN_CLOSE_WRITE)
or renamed a finished file into place (IN_MOVED_TO), and nothing has changed for the debounce
window since. A writer that keeps the file open but stops writing is taken after a longer quiet
period. Pure: no I/O, the caller passes the time.
"""

from __future__ import annotations

from enum import Enum


class Kind(Enum):
    WRITE = "write"  # IN_MODIFY, IN_CREATE: a writer is at work
    DONE = "done"  # IN_CLOSE_WRITE, IN_MOVED_TO, IN_ATTRIB: a writer finished (or only metadata changed)
    GONE = "gone"  # IN_DELETE, IN_MOVED_FROM: the file is not there any more


class Outcome(Enum):
    LOAD = "load"
    DELETED = "deleted"


class WriteTracker:
    def __init__(self, debounce: float, open_quiet: float | None = None) -> None:
        self.debounce = debounce
        # A file modified but not closed is taken only after this long without a change.
        self.open_quiet = open_quiet if open_quiet is not None else max(1.0, 20 * debounce)
        self._state: Kind | None = None
        self._at = 0.0

    def event(self, kind: Kind, now: float) -> None:
        self._state = kind
        self._at = now

    def deadline(self) -> float | None:
        """When ``due`` may next have something (None: nothing pending)."""
        if self._state is None:
            return None
        return self._at + (self.open_quiet if self._state is Kind.WRITE else self.debounce)

    def due(self, now: float) -> Outcome | None:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        state, self._state = self._state, None
        return Outcome.DELETED if state is Kind.GONE else Outcome.LOAD
