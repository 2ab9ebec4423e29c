"""Registrations through etcd (``registry.ops.Registrations``, the operations the registration API
calls): each registration is a key on an etcd lease whose TTL is the instance's; a heartbeat through any
replica keeps that lease alive (no write to the keyspace); deregistering puts the instance in
DRAINING on a lease of ``--drain-time``. A write is answered only once etcd took it: without
quorum the API answers 503 / UNAVAILABLE naming etcd, and the registry is unchanged.

An address:port is one instance's on every replica: the registration's transaction also claims
``addresses/<service>/<address>:<port>`` (holding the instance id, on the same lease) if no other
instance holds it, so of two registrations of one address through two replicas exactly one is taken;
the lease ending (expiry, or the end of draining) releases it. A new instance also stays only within
the quotas as counted in etcd (``_within_quotas``). The stored ``expires_at`` is the
registration's; a listing computes each ACTIVE instance's from its lease's remaining TTL (a read),
since heartbeats write nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from xdsd.registry.instance import Instance, RegistrationError, RegistrationInput
from xdsd.registry.registry import NotRegistered, Registry, address_taken
from xdsd.store.etcd import EtcdClient, StoreUnavailable
from xdsd.store.keys import Keys
from xdsd.store.sync import EtcdSync

log = logging.getLogger(__name__)

# etcd grants no lease shorter than its minimum TTL (about 2 s with the default election timeout).
MIN_LEASE_TTL = 2
# Lease lookups a listing makes at once (each a small read from etcd), and how long one answer is
# reused (listings in a burst, by any caller with a token, make at most one lookup per lease).
LIST_CONCURRENCY = 32
LEASE_LOOKUP_REUSE = 1.0


def lease_ttl(seconds: float) -> int:
    return max(MIN_LEASE_TTL, math.ceil(seconds))


class EtcdRegistrations:
    def __init__(self, registry: Registry, client: EtcdClient, keys: Keys, sync: EtcdSync) -> None:
        self.registry = registry
        self.client = client
        self.keys = keys
        self.sync = sync
        self._revoking: set[asyncio.Task[None]] = set()  # replaced leases being revoked (kept referenced)
        self._expiries: dict[int, tuple[float, float]] = {}  # lease -> (looked up at, expires at)

    async def _store(self, inst: Instance, ttl: float, *, claim: bool) -> None:
        """Write ``inst`` on a new lease of ``ttl``, with its address claim: RegistrationError if
        another instance holds the address and ``claim`` (a registration); without ``claim`` (a
        deregistration) the instance is written all the same. What etcd holds of the instance
        (read first: this replica's watch may not have seen its last write) gives the lease to
        revoke and the address to release; a concurrent write of the same instance through another
        replica can leave its old claim until that lease ends (the instance's TTL at most)."""
        key = self.keys.registration(inst.service, inst.instance_id)
        current = await self.client.get(key)
        stored = self.sync.instance(current) if current is not None else None
        lease = await self.client.grant(lease_ttl(ttl))
        value = json.dumps(inst.as_json(), separators=(",", ":")).encode()
        release = self.keys.address(*stored.address_key) if stored is not None else None
        puts = [(key, value)]
        if inst.token_id:
            puts.append((self.keys.owned(inst.token_id, *inst.key), b""))
        previous = stored.token_id if stored is not None else ""
        deletes = (self.keys.owned(previous, *inst.key),) if previous and previous != inst.token_id else ()
        # Without an answer the lease is left to end by itself: the write may have been taken.
        done, revision, holder = await self.client.put_claiming(
            self.keys.address(*inst.address_key), inst.instance_id.encode(), tuple(puts), lease, release, deletes)
        if not done and not claim:
            revision = await self.client.put(key, value, lease)
            done = True
        if not done:
            self._retire(lease)
            raise RegistrationError([address_taken(inst, (holder or b"?").decode(errors="replace"))])
        old = self.sync.leases.get(inst.key)
        self.sync.leases[inst.key] = lease
        self.sync.written[inst.key] = revision
        if claim and current is None:
            await self._within_quotas(inst, lease)
        for replaced in {old, current.lease if current is not None else 0} - {0, None, lease}:
            self._retire(replaced)  # nothing is on it any more

    async def _within_quotas(self, inst: Instance, lease: int) -> None:
        """A new instance (just stored) stays only if it is among the first created up to each limit
        (per service; per token): of the instances over a limit, the last created go, whichever
        replica took them, so the bound holds across replicas. What is over a limit is undone (its
        lease revoked) and QuotaExceeded raised; it may have been served for that moment. Below a
        limit this is one count per limit (a read)."""
        checks = [(self.keys.service(inst.service), self.keys.registration(*inst.key), self.registry.max_per_service,
                   self.registry.over_service_quota)]
        if inst.token_id:
            checks.append((self.keys.owner(inst.token_id), self.keys.owned(inst.token_id, *inst.key),
                           self.registry.max_per_token, self.registry.over_token_quota))
        try:
            for prefix, mine, limit, error in checks:
                if await self.client.count(prefix) > limit and mine not in await self.client.first_created(prefix, limit):
                    await self._revoke(lease)
                    raise error(inst)
        except StoreUnavailable as exc:  # it is stored: kept, as checked against this replica's view
            log.warning("%s/%s: quotas not checked in etcd: %s", inst.service, inst.instance_id, exc)

    def _retire(self, lease: int) -> None:
        task = asyncio.ensure_future(self._revoke(lease))
        self._revoking.add(task)
        task.add_done_callback(self._revoking.discard)

    async def _revoke(self, lease: int) -> None:
        try:
            await self.client.revoke(lease)
        except StoreUnavailable as exc:  # it ends by itself at its TTL
            log.debug("revoking a replaced lease: %s", exc)

    async def register(self, reg: Mapping[str, Any] | RegistrationInput, token_id: str = "") -> Instance:
        inst, _ = self.registry.prepare(reg, token_id)
        await self._store(inst, inst.ttl, claim=True)
        return self.registry.admit(inst)

    async def heartbeat(self, service: str, instance_id: str) -> Instance:
        inst = self.registry.get(service, instance_id)
        if inst.state != "ACTIVE":
            return inst
        lease = self.sync.leases.get(inst.key)
        if not lease or await self.client.keepalive(lease) <= 0:
            # Its lease ended (the watch is about to say so): register again.
            self.registry.forget(service, instance_id)
            raise NotRegistered(f"{service}/{instance_id} is not registered")
        current = self.registry.get(service, instance_id)
        return self.registry.touched(current)

    async def deregister(self, service: str, instance_id: str) -> Instance:
        inst = self.registry.get(service, instance_id)
        if inst.state == "DRAINING":
            return inst
        draining = self.registry.draining(inst)
        await self._store(draining, self.registry.drain_seconds, claim=False)
        return self.registry.admit(draining)

    async def listed(self, service: str | None = None) -> list[Instance]:
        """The instances, each ACTIVE one expiring when its lease does (heartbeats through any
        replica refresh the lease, not the stored ``expires_at``). To the second (etcd counts a
        lease's TTL in whole seconds); while etcd is unreachable, the stored expiries."""
        instances = self.registry.list(service)
        if not self.sync.connected:
            return instances  # etcd unreachable: no lookup waits for its timeout
        gate = asyncio.Semaphore(LIST_CONCURRENCY)
        now = self.registry.clock()
        self._expiries = {k: v for k, v in self._expiries.items() if now - v[0] < LEASE_LOOKUP_REUSE}

        async def current(inst: Instance) -> Instance:
            lease = self.sync.leases.get(inst.key)
            if inst.state != "ACTIVE" or not lease:
                return inst
            known = self._expiries.get(lease)
            if known is None:
                async with gate:
                    left = await self.client.time_to_live(lease)
                if left < 0:
                    return inst  # gone: the watch is about to drop it
                known = self._expiries[lease] = (now, self.registry.clock() + left)
            return dataclasses.replace(inst, expires_at=max(inst.expires_at, known[1]))

        try:
            return list(await asyncio.gather(*map(current, instances)))
        except StoreUnavailable as exc:
            log.debug("listing with the stored expiries: %s", exc)
            return instances
