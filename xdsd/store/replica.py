"""Each replica registers itself in etcd on a lease (``replicas/<id>``): where its xDS and admin
ports are and which proxies are connected to it. It is gone from every replica's list a few
seconds after it dies; ``/debug/replicas`` and ``xdsd status`` show the list."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable

from xdsd.errors import StoreUnavailable
from xdsd.store.etcd import EtcdClient
from xdsd.store.keys import Keys

log = logging.getLogger(__name__)

REPLICA_TTL = 5  # seconds: a dead replica leaves the list within this
REFRESH_EVERY = 1.0  # keep-alive, and a new proxy list if it changed


def replica_id(xds_address: tuple[str, int]) -> str:
    return f"{socket.gethostname()}-{xds_address[1]}-{os.getpid()}"


class ReplicaAnnouncer:
    def __init__(self, client: EtcdClient, keys: Keys, replica: str, info: dict[str, object],
                 proxies: Callable[[], list[str]]) -> None:
        self.client = client
        self.keys = keys
        self.id = replica
        self.info = info
        self.proxies = proxies
        self.lease = 0
        self._sent: list[str] | None = None

    def _value(self, proxies: list[str]) -> bytes:
        return json.dumps({**self.info, "id": self.id, "proxies": proxies, "updated_at": time.time()}).encode()

    async def once(self) -> None:
        proxies = sorted(self.proxies())
        if self.lease and await self.client.keepalive(self.lease) <= 0:
            self.lease = 0  # expired while etcd was away: announce again
        if not self.lease:
            self.lease = await self.client.grant(REPLICA_TTL)
            self._sent = None
        if proxies != self._sent:
            await self.client.put(self.keys.replica(self.id), self._value(proxies), self.lease)
            self._sent = proxies

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.once()
            except StoreUnavailable as exc:
                log.debug("replica announcement: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REFRESH_EVERY)

    async def withdraw(self) -> None:
        """At shutdown: leave the list at once (the lease would end it within REPLICA_TTL)."""
        if self.lease:
            with contextlib.suppress(StoreUnavailable):
                await self.client.revoke(self.lease)
