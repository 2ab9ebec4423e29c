"""What a candidate mesh would change, per node group: resources added, removed and changed, with a
compact field-level diff of each change. Secrets are compared by name only (their content is never
shown). Pure: snapshots in, a JSON-ready report out."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from xdsd import typeurls
from xdsd.cache import Snapshot, TypeSnapshot
from xdsd.redact import redacted_any

MAX_FIELDS = 20  # field-level lines per changed resource


def _as_dict(type_url: str, body: bytes) -> dict[str, Any]:
    return json_format.MessageToDict(redacted_any(type_url, body), preserving_proto_field_name=True)


def _leaves(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        if not value:
            out[path] = {}
        for k, v in value.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        if not value:
            out[path] = []
        for i, v in enumerate(value):
            _leaves(v, f"{path}[{i}]", out)
    else:
        out[path] = value


def field_diff(type_url: str, old: bytes, new: bytes) -> list[str]:
    """``path: old -> new`` for every leaf that differs (``+`` / ``-`` for added / removed leaves)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _leaves(_as_dict(type_url, old), "", before)
    _leaves(_as_dict(type_url, new), "", after)
    lines: list[str] = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            lines.append(f"- {path}: {before[path]!r}")
        elif path not in before:
            lines.append(f"+ {path}: {after[path]!r}")
        elif before[path] != after[path]:
            lines.append(f"~ {path}: {before[path]!r} -> {after[path]!r}")
    if len(lines) > MAX_FIELDS:
        lines = [*lines[:MAX_FIELDS], f"... and {len(lines) - MAX_FIELDS} more fields"]
    return lines


def _type_diff(type_url: str, old: TypeSnapshot, new: TypeSnapshot) -> dict[str, Any] | None:
    added = sorted(new.resources.keys() - old.resources.keys())
    removed = sorted(old.resources.keys() - new.resources.keys())
    changed: dict[str, list[str]] = {}
    for name in sorted(old.resources.keys() & new.resources.keys()):
        a, b = old.resources[name], new.resources[name]
        if a.version != b.version:
            changed[name] = [] if type_url == typeurls.SECRET else field_diff(type_url, a.body, b.body)
    if not (added or removed or changed):
        return None
    return {"added": added, "removed": removed, "changed": changed}


def snapshot_diff(old: Snapshot | None, new: Snapshot) -> dict[str, Any]:
    """Per type (CDS, EDS, LDS, RDS, SDS) what changes from ``old`` (None: nothing served) to ``new``."""
    out: dict[str, Any] = {}
    for type_url in typeurls.PUSH_ORDER:
        before = old.get(type_url) if old is not None else TypeSnapshot.empty(type_url)
        diff = _type_diff(type_url, before, new.get(type_url))
        if diff is not None:
            out[typeurls.short(type_url)] = diff
    return out


def render(report: dict[str, Any]) -> str:
    """The report as text, one group after another (``xdsd diff``, ``xdsd apply``)."""
    lines: list[str] = []
    for group, types in report.items():
        lines.append(f"{group}:")
        for kind, diff in types.items():
            for name in diff["added"]:
                lines.append(f"  {kind} + {name}")
            for name in diff["removed"]:
                lines.append(f"  {kind} - {name}")
            for name, fields in diff["changed"].items():
                lines.append(f"  {kind} ~ {name}")
                lines.extend(f"      {f}" for f in fields)
    return "\n".join(lines)
