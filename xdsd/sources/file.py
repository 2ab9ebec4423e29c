"""The mesh file: read, validated, re-read when a writer has finished with it.

Every way people rewrite a file works: an atomic rename, an editor's in-place save, ``sed -i``, a
shell redirect from a slow generator, truncate-then-write in chunks, delete-then-recreate. A torn
write is never taken as the mesh (``writes.WriteTracker``); an empty file is refused, not served as
an empty mesh; a deleted file keeps the last good mesh served.

A finished write is parsed at once, in a worker thread, while the debounce window runs
(``prepare``); the window's end then only checks that the bytes are still the ones parsed. The
content taken is the same; the parse no longer comes after the window. And only the services whose
lines changed are parsed again (``model.incremental``): an edit costs what it changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from xdsd.errors import FieldError, MeshError
from xdsd.model import Mesh, load_mesh
from xdsd.model.incremental import MeshReader
from xdsd.model.load import MAX_TEXT_BYTES
from xdsd.sources import inotify
from xdsd.sources.writes import Kind, Outcome, WriteTracker

log = logging.getLogger(__name__)

EMPTY_FILE = 'the file is empty; an empty mesh is written as "services: {}"'

_KINDS = (
    (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_ATTRIB, Kind.DONE),
    (inotify.IN_MODIFY | inotify.IN_CREATE, Kind.WRITE),
    (inotify.IN_DELETE | inotify.IN_MOVED_FROM, Kind.GONE),
)


class FileSource:
    def __init__(self, path: str | Path, debounce: float = 0.05) -> None:
        self.path = Path(path).absolute()
        self.debounce = debounce
        self._digest: str | None = None
        self.content: bytes | None = None  # the bytes of the last load that produced a mesh
        # (digest, what parsing those bytes gave) from ``prepare``, for ``load`` to take if the file
        # still holds them. Written by the worker thread, read and cleared on the loop.
        self._prepared: tuple[str, Mesh | MeshError] | None = None
        # Successive contents are read again only where they changed (used by one read at a time:
        # ``load`` waits for ``prepare``).
        self._reader = MeshReader()

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_TEXT_BYTES + 1)
        except OSError as exc:
            raise MeshError([FieldError("", f"cannot read {self.path}: {exc.strerror or exc}")]) from None
        if len(data) > MAX_TEXT_BYTES:
            raise MeshError([FieldError("", f"{self.path} is larger than {MAX_TEXT_BYTES // (1024 * 1024)} MiB")])
        return data

    def load(self) -> Mesh | None:
        """The file's mesh; None if its content has not changed since the last load.
        Raises MeshError with field paths when the file is invalid, empty or unreadable."""
        data = self.read()
        digest = hashlib.sha256(data).hexdigest()
        prepared, self._prepared = self._prepared, None
        if digest == self._digest:
            return None
        if prepared is not None and prepared[0] == digest:
            if isinstance(prepared[1], MeshError):
                raise MeshError(prepared[1].errors)
            mesh = prepared[1]
        else:
            mesh = parse_bytes(data, str(self.path), self._reader)
        self._digest = digest
        self.content = data
        return mesh

    def prepare(self) -> None:
        """Parse the file's current bytes for the next ``load`` (thread-safe against nothing else:
        the caller runs one at a time and waits for it before ``load``). Unreadable or unchanged
        content is left for ``load`` to report."""
        try:
            data = self.read()
        except MeshError:
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return
        try:
            result: Mesh | MeshError = parse_bytes(data, str(self.path), self._reader)
        except MeshError as exc:
            result = exc
        self._prepared = (digest, result)

    def digest(self) -> str | None:
        """The digest of the content last loaded."""
        return self._digest

    def forget(self) -> None:
        """Make the next load re-validate even an unchanged file."""
        self._digest = None

    async def changes(self, stop: asyncio.Event) -> AsyncIterator[Outcome]:
        """Yields LOAD once per finished write (or burst of them) and DELETED when the file is gone.
        Watches the directory, so a rename into place is seen like an in-place write."""
        if not inotify.available():  # pragma: no cover - Linux is the platform; the rest poll via watchfiles
            async for outcome in self._watchfiles(stop):
                yield outcome
            return
        watcher = inotify.Inotify()
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(watcher.fileno(), readable.set)
        tracker = WriteTracker(self.debounce)
        preparing: asyncio.Future[None] | None = None
        try:
            watcher.add_watch(str(self.path.parent), inotify.DIRECTORY_MASK)
            name = self.path.name
            stopping = asyncio.ensure_future(stop.wait())
            while not stop.is_set():
                deadline = tracker.deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                waiting = asyncio.ensure_future(readable.wait())
                await asyncio.wait({waiting, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if readable.is_set():
                    readable.clear()
                    now = time.monotonic()
                    for event in watcher.read():
                        if event.mask & inotify.IN_Q_OVERFLOW:
                            tracker.event(Kind.DONE, now)  # events were lost: look at the file
                        elif event.name == name:
                            for mask, kind in _KINDS:
                                if event.mask & mask:
                                    tracker.event(kind, now)
                                    if kind is Kind.DONE and (preparing is None or preparing.done()):
                                        preparing = asyncio.ensure_future(asyncio.to_thread(self.prepare))
                                    break
                        elif event.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
                            raise OSError(f"the directory of {self.path} was removed or moved")
                outcome = tracker.due(time.monotonic())
                if outcome is not None:
                    if preparing is not None:
                        await asyncio.wait({preparing})  # load() must not race the worker
                        preparing = None
                    yield outcome
            stopping.cancel()
        finally:
            if preparing is not None:
                preparing.cancel()
            loop.remove_reader(watcher.fileno())
            watcher.close()

    async def _watchfiles(self, stop: asyncio.Event) -> AsyncIterator[Outcome]:
        import watchfiles

        name = self.path.name
        async for batch in watchfiles.awatch(self.path.parent, stop_event=stop, debounce=max(1, int(self.debounce * 1000)),
                                             step=10, recursive=False, rust_timeout=1000, yield_on_timeout=False):
            if any(Path(p).name == name for _, p in batch):
                yield Outcome.LOAD if self.path.exists() else Outcome.DELETED


def parse_bytes(data: bytes, origin: str, reader: MeshReader | None = None) -> Mesh:
    """A mesh file's bytes -> Mesh, or MeshError (empty, not UTF-8, invalid). With ``reader``, only
    what changed since the reader's last text is parsed again (the result is the same)."""
    if all(not line.strip() or line.lstrip().startswith(b"#") for line in data.splitlines()):
        raise MeshError([FieldError("", EMPTY_FILE)])  # nothing but blanks and comments: a torn write
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MeshError([FieldError("", f"{origin} is not UTF-8: {exc}")]) from None
    return load_mesh(text) if reader is None else reader.read(text)
