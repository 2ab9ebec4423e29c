"""The registry: register, heartbeat, deregister (DRAINING, then gone), expire past the TTL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from xdsd.errors import FieldError
from xdsd.registry.instance import Instance, RegistrationError, RegistrationInput
from xdsd.registry.store import RegistryStore

log = logging.getLogger(__name__)

# Checks a registration against the mesh (service declared, ports, no clash); returns errors.
MeshCheck = Callable[[RegistrationInput, dict[tuple[str, str], Instance]], list[FieldError]]


# Registration changes are written at most this often (a burst becomes one write).
SAVE_EVERY = 0.1


class NotRegistered(KeyError):
    pass


class Registry:
    def __init__(self, store: RegistryStore, drain_seconds: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.drain_seconds = drain_seconds
        self.clock = clock
        now = clock()
        self._instances = {i.key: i for i in store.load() if i.expires_at > now}
        self.on_change: Callable[[], None] = lambda: None
        self.mesh_check: MeshCheck = lambda reg, instances: []
        self._dirty = False  # something not saved yet (heartbeats are saved at most every second)
        self._unsaved_change = False  # ... and it changes what is served
        self._saved_at = float("-inf")

    # -- operations -----------------------------------------------------------------------

    def register(self, data: dict[str, Any]) -> Instance:
        reg = RegistrationInput.parse(data)
        errors = self.mesh_check(reg, self._instances)
        if errors:
            raise RegistrationError(errors)
        inst = Instance(
            service=reg.service, instance_id=reg.instance_id, address=reg.address, port=reg.port,
            weight=reg.weight, zone=reg.zone, labels=dict(reg.labels), ttl=reg.ttl, state="ACTIVE",
            expires_at=self.clock() + reg.ttl,
        )
        old = self._instances.get(inst.key)
        self._instances[inst.key] = inst
        if old is None or _serving_fields(old) != _serving_fields(inst):
            log.info("registered %s/%s at %s:%d (ttl %ss)", inst.service, inst.instance_id, inst.address, inst.port, inst.ttl)
            self._changed()
        else:
            self._dirty = True
        return inst

    def heartbeat(self, service: str, instance_id: str) -> Instance:
        inst = self._instances.get((service, instance_id))
        if inst is None:
            raise NotRegistered(f"{service}/{instance_id} is not registered")
        if inst.state != "ACTIVE":
            return inst  # draining: the heartbeat does not bring it back
        inst = _replace(inst, expires_at=self.clock() + inst.ttl)
        self._instances[inst.key] = inst
        self._dirty = True
        return inst

    def deregister(self, service: str, instance_id: str) -> Instance:
        inst = self._instances.get((service, instance_id))
        if inst is None:
            raise NotRegistered(f"{service}/{instance_id} is not registered")
        if inst.state == "DRAINING":
            return inst
        inst = _replace(inst, state="DRAINING", expires_at=self.clock() + self.drain_seconds)
        self._instances[inst.key] = inst
        log.info("draining %s/%s for %ss", service, instance_id, self.drain_seconds)
        self._changed()
        return inst

    def list(self, service: str | None = None) -> list[Instance]:
        return sorted((i for i in self._instances.values() if not service or i.service == service), key=lambda i: i.key)

    def sweep(self) -> list[Instance]:
        """Removes instances past their TTL (or drain period). Also flushes heartbeats to the store."""
        now = self.clock()
        gone = [i for i in self._instances.values() if i.expires_at <= now]
        for inst in gone:
            del self._instances[inst.key]
            log.info("%s/%s %s", inst.service, inst.instance_id, "drained" if inst.state == "DRAINING" else "expired")
        if gone:
            self._changed()
        elif self._dirty and now - self._saved_at >= (SAVE_EVERY if self._unsaved_change else 1.0):
            self._save()
        return gone

    def next_expiry(self) -> float | None:
        return min((i.expires_at for i in self._instances.values()), default=None)

    def instances(self) -> dict[tuple[str, str], Instance]:
        return dict(self._instances)

    # -- internals ------------------------------------------------------------------------

    def _changed(self) -> None:
        # Saved at once unless a save happened within SAVE_EVERY; then the sweep (every 0.1 s)
        # saves the burst as one. 10,000 registrations at fleet start-up were 10,000 rewrites of
        # the whole file. What a crash loses of a burst comes back: agents re-register on 404.
        self._dirty = self._unsaved_change = True
        if self.clock() - self._saved_at >= SAVE_EVERY:
            self._save()
        self.on_change()

    def flush(self) -> None:
        """Write what is not saved yet (at shutdown)."""
        if self._dirty:
            self._save()

    def _save(self) -> None:
        self.store.save(list(self._instances.values()))
        self._dirty = self._unsaved_change = False
        self._saved_at = self.clock()


def _serving_fields(i: Instance) -> tuple[object, ...]:
    return (i.address, i.port, i.weight, i.zone, tuple(sorted(i.labels.items())), i.state)


def _replace(i: Instance, **changes: Any) -> Instance:
    data = i.as_json()
    data.update(changes)
    return Instance.from_json(data)
