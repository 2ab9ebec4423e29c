"""Where registrations are kept so that they survive an xdsd restart while their TTL is live.

A small interface: the local state directory is the embedded default; an etcd store (leases for
registrations, watches for changes) is how several replicas will share one registry."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

from xdsd.registry.instance import Instance, RegistrationError, show

log = logging.getLogger(__name__)


class RegistryStore(Protocol):
    def load(self) -> list[Instance]: ...
    def save(self, instances: list[Instance]) -> None: ...


class LocalStore:
    """All registrations in one JSON file, replaced atomically on every save. Each instance's JSON
    is kept while the instance object is unchanged (instances are immutable; a heartbeat makes a
    new one), so a save encodes only what changed."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "registrations.json"
        self._encoded: dict[tuple[str, str], tuple[Instance, str]] = {}

    def load(self) -> list[Instance]:
        """What the file holds that can be served. An entry that breaks a rule (a file written
        before the rules, or edited by hand) is dropped with a warning; a file that cannot be read
        at all is set aside as ``registrations.json.unreadable`` and the registry starts empty."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw.decode("utf-8"))
            items = data["instances"]
            if not isinstance(items, list):
                raise TypeError("instances is not a list")
        except (ValueError, RecursionError, TypeError, KeyError) as exc:
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.error("%s cannot be read (%s): moving it to %s; starting with no registrations",
                      self.path, type(exc).__name__, aside)
            try:
                os.replace(self.path, aside)
            except OSError as err:  # the next save replaces it
                log.error("cannot move %s aside: %s", self.path, err)
            return []
        return [inst for n, item in enumerate(items) if (inst := self._entry(n, item)) is not None]

    def _entry(self, n: int, item: object) -> Instance | None:
        try:
            return Instance.load(item)
        except RegistrationError as exc:
            what = f"{show(item.get('service'))}/{show(item.get('instance_id'))}" if isinstance(item, dict) else "?"
            log.warning("%s: dropped entry %d (%s): %s", self.path, n, what, exc)
            return None

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
