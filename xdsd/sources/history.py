"""The accepted revisions of the mesh file, kept in the state directory (``history/``): the last
``keep`` of them, each with its number, time, content digest, how it came (a file edit, ``xdsd
apply``, ``xdsd rollback``) and a summary. ``xdsd rollback`` writes one back into the file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
INDEX = "index.jsonl"


@dataclass(frozen=True, slots=True)
class Entry:
    revision: int
    at: float
    digest: str
    how: str  # "file", "apply", "rollback"
    summary: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


class History:
    def __init__(self, state_dir: Path, keep: int = 50) -> None:
        self.dir = state_dir / HISTORY_DIR
        self.keep = max(1, keep)
        self.entries: list[Entry] = self._load()

    def _load(self) -> list[Entry]:
        try:
            lines = (self.dir / INDEX).read_text().splitlines()
        except OSError:
            return []
        entries = []
        for line in lines:
            try:
                data = json.loads(line)
                entries.append(Entry(int(data["revision"]), float(data["at"]), str(data["digest"]), str(data["how"]),
                                     str(data["summary"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
        return [e for e in entries if (self.dir / f"{e.revision}.yaml").exists()]

    @property
    def current(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    def record(self, content: bytes, how: str, summary: str) -> Entry:
        """Keep ``content`` as the newest revision (unless it is the newest already)."""
        digest = hashlib.sha256(content).hexdigest()
        last = self.current
        if last is not None and last.digest == digest:
            return last
        entry = Entry((last.revision + 1) if last else 1, time.time(), digest, how, summary)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.dir / f"{entry.revision}.yaml", content)
            self.entries.append(entry)
            dropped = self.entries[:-self.keep]
            self.entries = self.entries[-self.keep:]
            _atomic_write(self.dir / INDEX, "".join(json.dumps(e.as_json()) + "\n" for e in self.entries).encode())
            for old in dropped:
                (self.dir / f"{old.revision}.yaml").unlink(missing_ok=True)
        except OSError as exc:  # history is for the operator; serving goes on without it
            log.warning("cannot record config revision %d in %s: %s", entry.revision, self.dir, exc)
        return entry

    def get(self, revision: int) -> tuple[Entry, bytes] | None:
        for entry in self.entries:
            if entry.revision == revision:
                try:
                    return entry, (self.dir / f"{revision}.yaml").read_bytes()
                except OSError:
                    return None
        return None

    def previous(self) -> Entry | None:
        return self.entries[-2] if len(self.entries) >= 2 else None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``'s content in one step (a temporary file in its directory, then a rename),
    keeping its permissions: what ``xdsd apply`` and ``xdsd rollback`` do to the mesh file."""
    tmp = path.with_name(f".{path.name}.xdsd-{os.getpid()}.tmp")
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
