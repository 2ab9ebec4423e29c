"""The mesh file: read, validated, re-read when it changes (atomic replaces included)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import watchfiles

from xdsd.errors import FieldError, MeshError
from xdsd.model import Mesh, load_mesh

log = logging.getLogger(__name__)


class FileSource:
    def __init__(self, path: str | Path, debounce: float = 0.05) -> None:
        self.path = Path(path).absolute()
        self.debounce = debounce
        self._digest: str | None = None

    def load(self) -> Mesh | None:
        """The file's mesh; None if its content has not changed since the last load.
        Raises MeshError with field paths when the file is invalid or unreadable."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise MeshError([FieldError("", f"cannot read {self.path}: {exc.strerror or exc}")]) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MeshError([FieldError("", f"{self.path} is not UTF-8: {exc}")]) from None
        mesh = load_mesh(text)
        self._digest = digest
        return mesh

    def forget(self) -> None:
        """Make the next load re-validate even an unchanged file."""
        self._digest = None

    async def changes(self, stop: asyncio.Event) -> AsyncIterator[None]:
        """Yields once per burst of changes to the file. Watches the directory, so an editor's
        write-to-temp-and-rename is seen like an in-place write."""
        name = self.path.name
        async for batch in watchfiles.awatch(
            self.path.parent,
            stop_event=stop,
            debounce=max(1, int(self.debounce * 1000)),
            step=10,
            recursive=False,
            rust_timeout=1000,
            yield_on_timeout=False,
        ):
            if any(Path(p).name == name for _, p in batch):
                yield None
