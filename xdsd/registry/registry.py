"""The registry: register, heartbeat, deregister (DRAINING, then gone), expire past the TTL.

Rules:
- An instance is (service, instance_id); a service only ever touches its own instances.
- An address:port belongs to one instance id within its service (spellings of one IP are one
  address) until that instance is gone: expired, or drained after deregistering. Registering it
  under another id of the same service is refused (400 naming ``address``); another service may
  use the same address:port (its own cluster), so no service can block another one's instances.
- Quotas: at most ``max_per_service`` instances per service and ``max_per_token`` per token id
  (the token that registered an instance last owns it); re-registering an instance never counts
  twice. Over a quota: QuotaExceeded (HTTP 429 / RESOURCE_EXHAUSTED) naming the limit.
- register, heartbeat and deregister are O(1) in the number of instances (indexes by key, by
  service, by address, and counts per token); ``list`` sorts again only services whose membership
  changed; ``sweep`` is one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from xdsd.errors import FieldError
from xdsd.registry.instance import Instance, RegistrationError, RegistrationInput, servable, show
from xdsd.registry.store import RegistryStore

log = logging.getLogger(__name__)

# Checks a registration against the mesh (service declared, sidecar port, not a static endpoint).
MeshCheck = Callable[[RegistrationInput], list[FieldError]]

# How often lapsed registrations are looked for (an instance leaves EDS within TTL + this).
SWEEP_EVERY = 0.1

# Registration changes are written at most this often (a burst becomes one write).
SAVE_EVERY = 0.1
DEFAULT_MAX_PER_SERVICE = 1000
DEFAULT_MAX_PER_TOKEN = 1000


class NotRegistered(KeyError):
    pass


class QuotaExceeded(Exception):
    """A registration over a limit: HTTP 429 / RESOURCE_EXHAUSTED."""

    def __init__(self, error: FieldError) -> None:
        self.errors = [error]
        super().__init__(str(error))


class Registry:
    def __init__(self, store: RegistryStore, drain_seconds: float = 5.0, clock: Callable[[], float] = time.time, *,
                 max_per_service: int = DEFAULT_MAX_PER_SERVICE, max_per_token: int = DEFAULT_MAX_PER_TOKEN, expire_locally: bool = True) -> None:
        self.store = store
        self.drain_seconds = drain_seconds
        self.clock = clock
        self.max_per_service = max_per_service
        self.max_per_token = max_per_token
        self._instances: dict[tuple[str, str], Instance] = {}
        self._by_address: dict[tuple[str, str, int], tuple[str, str]] = {}
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._order: dict[str, list[str]] = {}  # per service, its instance ids sorted (until one comes or goes)
        self._per_token: Counter[str] = Counter()
        self.on_change: Callable[[], None] = lambda: None
        self.mesh_check: MeshCheck = lambda reg: []
        self._dirty = False  # something not saved yet (heartbeats are saved at most every second)
        self._unsaved_change = False  # ... and it changes what is served
        self._saved_at = float("-inf")
        # False with a shared store: an instance goes when its lease ends there, not by this clock
        # (so no instance is dropped because its heartbeats could not be stored).
        self.expire_locally = expire_locally
        self._load()

    def _load(self) -> None:
        now = self.clock()
        for inst in self.store.load():
            if inst.expires_at <= now:
                continue
            holder = self._by_address.get(inst.address_key)
            if inst.key in self._instances or (holder is not None and holder != inst.key):
                log.warning("registrations: dropped %s/%s at %s:%d: the address or id is taken by an earlier entry",
                            show(inst.service), show(inst.instance_id), show(inst.address), inst.port)
                continue
            self._put(inst)  # quotas are not applied to what was admitted before

    # -- operations -----------------------------------------------------------------------

    def register(self, data: Mapping[str, Any] | RegistrationInput, token_id: str = "") -> Instance:
        """Adds or replaces an instance. RegistrationError (bad input, mesh rules, address taken),
        QuotaExceeded; nothing changes when either is raised."""
        return self.admit(self.prepare(data, token_id)[0])

    def prepare(self, data: Mapping[str, Any] | RegistrationInput, token_id: str = "") -> tuple[Instance, Instance | None]:
        """The instance a registration makes and the one it replaces, checked against every rule;
        nothing changes (a shared store writes it before ``admit``)."""
        reg = data if isinstance(data, RegistrationInput) else RegistrationInput.parse(data)
        errors = self.mesh_check(reg)
        inst = Instance.of(reg, self.clock() + reg.ttl, token_id)
        old = self._instances.get(inst.key)
        holder = self._by_address.get(inst.address_key)
        if holder is not None and holder != inst.key:
            errors.append(address_taken(inst, holder[1]))
        if errors:
            raise RegistrationError(errors)
        self._check_quotas(inst, old)
        errors = servable(inst)
        if errors:  # pragma: no cover - the field rules make every registration servable
            log.error("registration refused: %s/%s passed validation but cannot be served: %s",
                      show(inst.service), show(inst.instance_id), errors)
            raise RegistrationError(errors)
        return inst, old

    def admit(self, inst: Instance) -> Instance:
        """Serve ``inst`` (checked by ``prepare``, or read from the shared store)."""
        old = self._instances.get(inst.key)
        self._put(inst)
        if old is None or _serving_fields(old) != _serving_fields(inst):
            if inst.state == "ACTIVE":
                log.info("registered %s/%s at %s:%d (ttl %ss)", inst.service, inst.instance_id, inst.address, inst.port,
                         inst.ttl)
            else:
                log.info("draining %s/%s", inst.service, inst.instance_id)
            self._changed()
        else:
            self._dirty = True
        return inst

    def forget(self, service: str, instance_id: str) -> Instance | None:
        """Drop an instance the shared store no longer holds (its lease ended, or it drained)."""
        inst = self._instances.get((service, instance_id))
        if inst is None:
            return None
        self._drop(inst)
        log.info("%s/%s %s", inst.service, inst.instance_id, "drained" if inst.state == "DRAINING" else "expired")
        self._changed()
        return inst

    def replace_all(self, instances: list[Instance]) -> None:
        """The shared store's full list (first list, or again after a compaction): one change."""
        keep = {i.key for i in instances}
        changed = False
        for inst in [i for k, i in self._instances.items() if k not in keep]:
            self._drop(inst)
            changed = True
        for inst in instances:
            old = self._instances.get(inst.key)
            holder = self._by_address.get(inst.address_key)
            if holder is not None and holder != inst.key:
                log.warning("registrations: %s/%s at %s:%d skipped: the address is %s/%s's", show(inst.service),
                            show(inst.instance_id), show(inst.address), inst.port, *holder)
                continue
            self._put(inst)
            changed = changed or old is None or _serving_fields(old) != _serving_fields(inst)
        if changed:
            self._changed()

    def heartbeat(self, service: str, instance_id: str) -> Instance:
        return self.touched(self.get(service, instance_id))

    def touched(self, inst: Instance) -> Instance:
        """``inst`` heart-beat now (its TTL starts again)."""
        if inst.state != "ACTIVE":
            return inst  # draining: the heartbeat does not bring it back
        inst = dataclasses.replace(inst, expires_at=self.clock() + inst.ttl)
        self._put(inst)
        self._dirty = True
        return inst

    def deregister(self, service: str, instance_id: str) -> Instance:
        inst = self.get(service, instance_id)
        if inst.state == "DRAINING":
            return inst
        inst = self.draining(inst)
        self._put(inst)
        log.info("draining %s/%s for %ss", service, instance_id, self.drain_seconds)
        self._changed()
        return inst

    def draining(self, inst: Instance) -> Instance:
        return dataclasses.replace(inst, state="DRAINING", expires_at=self.clock() + self.drain_seconds)

    def list(self, service: str | None = None) -> list[Instance]:
        """Instances by (service, instance_id). Each service's order is sorted again only after its
        membership changed: a revision after one registration does not sort every instance."""
        if service:
            return self._sorted(service)
        out: list[Instance] = []
        for name in sorted(self._by_service):
            out += self._sorted(name)
        return out

    def _sorted(self, service: str) -> list[Instance]:
        members = self._by_service.get(service)
        if not members:
            return []
        ids = self._order.get(service)
        if ids is None:
            ids = self._order[service] = sorted(members)
        return list(map(members.__getitem__, ids))

    def count(self, service: str | None = None) -> int:
        return len(self._by_service.get(service, {})) if service else len(self._instances)

    def owned_by(self, token_id: str) -> int:
        """How many instances ``token_id`` registered (and still owns)."""
        return self._per_token[token_id] if token_id else 0

    def sweep(self) -> list[Instance]:
        """Removes instances past their TTL (or drain period). Also flushes heartbeats to the store."""
        now = self.clock()
        # With a shared store its leases expire registrations (its watch drops them), not this clock.
        gone = [i for i in self._instances.values() if i.expires_at <= now] if self.expire_locally else []
        for inst in gone:
            self._drop(inst)
            log.info("%s/%s %s", inst.service, inst.instance_id, "drained" if inst.state == "DRAINING" else "expired")
        if gone:
            self._changed()
        elif self._dirty and now - self._saved_at >= (SAVE_EVERY if self._unsaved_change else 1.0):
            self._save()
        return gone

    async def sweep_forever(self, stop: asyncio.Event, every: float = SWEEP_EVERY) -> None:
        """Expire registrations whose heartbeats lapsed, within ``every`` of their TTL; and save."""
        while not stop.is_set():
            self.sweep()
            # Nothing registered and nothing to save: nothing can lapse before the next registration,
            # which is served at once; sweep again within a second.
            idle = not self._instances and not self._dirty
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(every, 1.0) if idle else every)

    def next_expiry(self) -> float | None:
        return min((i.expires_at for i in self._instances.values()), default=None)

    def instances(self) -> dict[tuple[str, str], Instance]:
        return dict(self._instances)

    # -- indexes ------------------------------------------------------------------------

    def get(self, service: str, instance_id: str) -> Instance:
        inst = self._instances.get((service, instance_id))
        if inst is None:
            raise NotRegistered(f"{service}/{instance_id} is not registered")
        return inst

    def _check_quotas(self, inst: Instance, old: Instance | None) -> None:
        if old is None and len(self._by_service.get(inst.service, {})) >= self.max_per_service:
            raise self.over_service_quota(inst)
        owner = old.token_id if old is not None else None
        if inst.token_id and owner != inst.token_id and self._per_token[inst.token_id] >= self.max_per_token:
            raise self.over_token_quota(inst)

    def over_service_quota(self, inst: Instance) -> QuotaExceeded:
        return QuotaExceeded(FieldError("service", f"{inst.service} has {self.max_per_service} registered "
                                                   f"instances, the limit per service (xdsd serve --max-instances-per-service)"))

    def over_token_quota(self, inst: Instance) -> QuotaExceeded:
        return QuotaExceeded(FieldError("token", f"this token (id {inst.token_id}) has registered "
                                                 f"{self.max_per_token} instances, the limit per token"))

    def _put(self, inst: Instance) -> None:
        """Adds ``inst`` in place of the instance of its key, if any (whose address may differ)."""
        old = self._instances.get(inst.key)
        if old is not None:
            self._unindex(old)
        else:
            self._order.pop(inst.service, None)
        self._instances[inst.key] = inst
        self._by_service.setdefault(inst.service, {})[inst.instance_id] = inst
        self._index(inst)

    def _drop(self, inst: Instance) -> None:
        self._unindex(inst)
        del self._instances[inst.key]
        members = self._by_service[inst.service]
        del members[inst.instance_id]
        self._order.pop(inst.service, None)
        if not members:
            del self._by_service[inst.service]

    def _index(self, inst: Instance) -> None:
        self._by_address[inst.address_key] = inst.key
        if inst.token_id:
            self._per_token[inst.token_id] += 1

    def _unindex(self, inst: Instance) -> None:
        if self._by_address.get(inst.address_key) == inst.key:
            del self._by_address[inst.address_key]
        if inst.token_id:
            self._per_token[inst.token_id] -= 1
            if self._per_token[inst.token_id] <= 0:
                del self._per_token[inst.token_id]

    # -- saving ---------------------------------------------------------------------------

    def _changed(self) -> None:
        # Saved at once unless a save happened within SAVE_EVERY; then the sweep (every 0.1 s)
        # saves the burst as one. What a crash loses of a burst comes back: agents re-register on 404.
        self._dirty = self._unsaved_change = True
        if self.clock() - self._saved_at >= SAVE_EVERY:
            self._save()
        try:
            self.on_change()
        except Exception:  # the registry is right; serving it failed: a bug to log, not the caller's
            log.exception("applying a registry change failed")

    def flush(self) -> None:
        """Write what is not saved yet (at shutdown)."""
        if self._dirty:
            self._save()

    def _save(self) -> None:
        try:
            self.store.save(list(self._instances.values()))
        except OSError as exc:  # kept dirty: the next sweep tries again
            log.error("cannot save registrations: %s", exc)
            self._saved_at = self.clock()
            return
        self._dirty = self._unsaved_change = False
        self._saved_at = self.clock()


def address_taken(inst: Instance, holder_id: str) -> FieldError:
    """The refusal of ``inst``: its address:port is instance ``holder_id``'s (of the same service)."""
    return FieldError("address", f"{inst.address}:{inst.port} is already registered as {inst.service}/{holder_id} "
                                 f"(an address:port is one instance of a service)")


def _serving_fields(i: Instance) -> tuple[object, ...]:
    return (i.address, i.port, i.weight, i.zone, tuple(sorted(i.labels.items())), i.state)
