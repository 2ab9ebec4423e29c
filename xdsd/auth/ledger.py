"""What was issued and what was revoked, kept in the state directory.

- ``tokens/issued.jsonl``: one line per token minted (id, kind, node, cluster, times, key id) —
  never the token itself. Appended with O_APPEND, so concurrent commands do not tear it.
- ``tokens/revoked.json``: token ids and node ids that are refused from now on, each with when.
  A node id revocation refuses every token of that node issued up to that moment; a token issued
  for the node afterwards works (re-enrolment).

``xdsd serve`` re-reads both when they change (``Revocations.refresh``), so ``xdsd token revoke``
on the control-plane host takes effect on the running server within a second.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdsd.auth.tokens import Claims

LEDGER_DIR = "tokens"
ISSUED_FILE = "issued.jsonl"
REVOKED_FILE = "revoked.json"
# Expired records are dropped from the issued list once it grows past this size.
COMPACT_AT_BYTES = 1 << 20


def _ledger(state_dir: Path) -> Path:
    return state_dir / LEDGER_DIR


def record_issued(state_dir: Path, claims: Claims) -> None:
    path = _ledger(state_dir) / ISSUED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(claims.as_json(), separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > COMPACT_AT_BYTES:
        _compact(path)


def _compact(path: Path) -> None:
    now = time.time()
    kept = [c for c in _read_issued(path) if c.get("expires_at", 0) > now]  # type: ignore[operator]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(c, separators=(",", ":")) + "\n" for c in kept))
    os.replace(tmp, path)


def _read_issued(path: Path) -> list[dict[str, object]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(item, dict):
            out.append(item)
    return out


def issued(state_dir: Path) -> list[dict[str, object]]:
    return _read_issued(_ledger(state_dir) / ISSUED_FILE)


@dataclass
class Revocations:
    """Revoked token ids and node ids (each with the time of revocation)."""

    ids: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, float] = field(default_factory=dict)

    def revoked(self, token_id: str, node_id: str, issued_at: float) -> str | None:
        """Why the token (``token_id``, of ``node_id``, issued at ``issued_at``) is revoked, or None."""
        if token_id in self.ids:
            return f"token {token_id} was revoked"
        at = self.nodes.get(node_id) if node_id else None
        if at is not None and issued_at <= at:
            return f"the tokens of node {node_id!r} were revoked"
        return None

    @classmethod
    def from_json(cls, data: object) -> Revocations:
        """The ``{"ids": {...}, "nodes": {...}}`` form (revoked.json, or etcd's copy); junk is ignored."""
        if not isinstance(data, dict):
            return cls()
        return cls(_times(data.get("ids")), _times(data.get("nodes")))

    def as_json(self) -> dict[str, dict[str, float]]:
        return {"ids": self.ids, "nodes": self.nodes}

    @classmethod
    def load(cls, state_dir: Path) -> Revocations:
        try:
            data = json.loads((_ledger(state_dir) / REVOKED_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(_times(data.get("ids")), _times(data.get("nodes")))

    def save(self, state_dir: Path) -> None:
        path = _ledger(state_dir) / REVOKED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"ids": self.ids, "nodes": self.nodes}, indent=1, sort_keys=True))
        os.replace(tmp, path)


def _times(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def revoke(state_dir: Path, *, token_id: str | None = None, node_id: str | None = None) -> Revocations:
    """Add a revocation (read-modify-write of a small file; the command runs on the control-plane host)."""
    rev = Revocations.load(state_dir)
    now = time.time()
    if token_id:
        rev.ids[token_id] = now
    if node_id:
        rev.nodes[node_id] = now
    rev.save(state_dir)
    return rev


def fingerprint(state_dir: Path) -> tuple[object, ...]:
    """Changes whenever the revocations or the signing keys change (cheap: a few stat calls)."""
    from xdsd.auth.tokens import KEY_FILE, PREVIOUS_KEYS_DIR

    out: list[object] = []
    for path in (_ledger(state_dir) / REVOKED_FILE, state_dir / KEY_FILE, state_dir / PREVIOUS_KEYS_DIR):
        try:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)
