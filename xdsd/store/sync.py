"""A replica's view of etcd: one full list, then a watch of the whole prefix from the listed
revision. Registrations go into the registry, the mesh to the controller, revocations and the token
keys into the state directory, other replicas into ``replicas``. When the watch breaks the replica lists again
(after a compaction past its revision, or etcd coming back); until the first list succeeded it is
not ready. Every replica builds its snapshots from the same keys, so they agree on versions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from xdsd.registry.instance import Instance, RegistrationError
from xdsd.registry.registry import Registry
from xdsd.store.etcd import Compacted, EtcdClient, Event, KeyValue, StoreUnavailable
from xdsd.store.keys import Keys
from xdsd.store.secrets import (
    mirror_previous_keys,
    remove_previous_key,
    write_previous_key,
    write_revocations,
    write_token_key,
)

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.2, 2.0


class EtcdSync:
    def __init__(self, client: EtcdClient, keys: Keys, registry: Registry, state_dir: Path,
                 on_mesh: Callable[[bytes, int], None]) -> None:
        self.client = client
        self.keys = keys
        self.registry = registry
        self.state_dir = state_dir
        self.on_mesh = on_mesh  # (content, etcd mod revision) of a new mesh
        self.revision = 0  # the store revision seen last (list or watch)
        self.mesh: KeyValue | None = None
        self.leases: dict[tuple[str, str], int] = {}  # registration -> its etcd lease
        # registration -> the store revision of this replica's own last write of it: the watch
        # brings that write (and older ones) back later; they are not applied again.
        self.written: dict[tuple[str, str], int] = {}
        self.replicas: dict[str, dict[str, object]] = {}
        self.listed = False  # a full list has succeeded at least once
        self.connected = False  # the watch is up (False while etcd is unreachable)
        self.relists = 0
        self.expected: bytes | None = None  # a mesh this replica is writing (EtcdMesh.apply serves it)
        self.last_error: str | None = None

    # -- a full list ---------------------------------------------------------------------------

    async def load(self) -> None:
        """List the prefix and make the registry, the mesh and the replicas match it exactly."""
        revision, kvs = await self.client.list(self.keys.root)
        instances: list[Instance] = []
        leases: dict[tuple[str, str], int] = {}
        replicas: dict[str, dict[str, object]] = {}
        mesh = None
        previous: dict[bytes, bytes] = {}  # the token keys rotated out
        for kv in kvs:
            if kv.key == self.keys.mesh:
                mesh = kv
            elif kv.key.startswith(self.keys.registrations):
                inst = self.instance(kv)
                if inst is not None:
                    instances.append(inst)
                    leases[inst.key] = kv.lease
            elif kv.key.startswith(self.keys.replicas):
                self._replica(kv, replicas)
            elif kv.key == self.keys.revocations:
                await asyncio.to_thread(write_revocations, self.state_dir, kv.value)
            elif kv.key == self.keys.token_key:
                await asyncio.to_thread(write_token_key, self.state_dir, kv.value)
            elif kv.key.startswith(self.keys.previous_token_keys):
                previous[kv.key[len(self.keys.previous_token_keys):]] = kv.value
        await asyncio.to_thread(mirror_previous_keys, self.state_dir, previous)
        self.revision = revision
        self.leases = leases
        self.written.clear()
        self.replicas = replicas
        self.registry.replace_all(instances)
        if mesh is not None:
            self._mesh(mesh)
        self.listed = True

    # -- following -----------------------------------------------------------------------------

    async def follow(self, stop: asyncio.Event) -> None:
        """Watch from the last revision; list again whenever the watch cannot go on."""
        delay = RETRY_MIN
        while not stop.is_set():
            try:
                if not self.listed:
                    await self.load()
                watching = asyncio.ensure_future(self._watch())
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    if not watching.done():
                        watching.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await watching
                if stop.is_set():
                    return
                watching.result()
            except Compacted as exc:
                log.warning("%s; listing again", exc)
                self.relists += 1
                self.listed = False
                continue
            except StoreUnavailable as exc:
                self.connected = False
                if self.last_error != str(exc):
                    log.warning("%s: serving the last state; retrying", exc)
                self.last_error = str(exc)
                # Whatever happened while the watch was down is caught up from self.revision,
                # or by a list if it was compacted meanwhile.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(RETRY_MAX, delay * 2)
                continue

    async def _watch(self) -> None:
        self.connected = True
        self.last_error = None
        async for batch in self.client.watch(self.keys.root, self.revision + 1):
            for event in batch:
                self._event(event)
                self.revision = max(self.revision, event.kv.mod_revision)

    def _event(self, e: Event) -> None:
        key = e.kv.key
        if key == self.keys.mesh:
            if not e.deleted:
                self._mesh(e.kv)
        elif key.startswith(self.keys.registrations):
            ids = self._ids(key)
            if ids is None or self.written.get(ids, 0) >= e.kv.mod_revision:
                return
            self.written.pop(ids, None)
            if e.deleted:
                self.leases.pop(ids, None)
                self.registry.forget(*ids)
                return
            inst = self.instance(e.kv)
            if inst is not None:
                self.leases[inst.key] = e.kv.lease
                try:
                    self.registry.admit(inst)
                except Exception:  # noqa: BLE001 - one bad entry must not stop the watch
                    log.exception("registration %s not applied", key.decode(errors="replace"))
        elif key.startswith(self.keys.replicas):
            if e.deleted:
                self.replicas.pop(key[len(self.keys.replicas):].decode(errors="replace"), None)
            else:
                self._replica(e.kv, self.replicas)
        elif key == self.keys.revocations and not e.deleted:
            write_revocations(self.state_dir, e.kv.value)  # a small file, rarely
        elif key == self.keys.token_key and not e.deleted:
            write_token_key(self.state_dir, e.kv.value)  # rotated (Access.refresh reads it)
        elif key.startswith(self.keys.previous_token_keys):
            kid = key[len(self.keys.previous_token_keys):]
            if e.deleted:
                remove_previous_key(self.state_dir, kid)  # retired: its tokens and streams end
            else:
                write_previous_key(self.state_dir, kid, e.kv.value)

    # -- values ----------------------------------------------------------------------------------

    def _mesh(self, kv: KeyValue) -> None:
        if (self.mesh is not None and self.mesh.value == kv.value) or kv.value == self.expected:
            self.mesh = kv
            return
        self.mesh = kv
        self.on_mesh(kv.value, kv.mod_revision)

    def _ids(self, key: bytes) -> tuple[str, str] | None:
        service, _, instance_id = key[len(self.keys.registrations):].decode(errors="replace").partition("/")
        return (service, instance_id) if service and instance_id else None

    def instance(self, kv: KeyValue) -> Instance | None:
        try:
            inst = Instance.load(json.loads(kv.value))
        except (ValueError, RegistrationError) as exc:  # written by hand, or by a newer version
            log.warning("etcd: %s is not a registration xdsd can serve (%s): ignored", kv.key.decode(errors="replace"), exc)
            return None
        if (inst.service, inst.instance_id) != self._ids(kv.key):
            log.warning("etcd: %s holds another instance: ignored", kv.key.decode(errors="replace"))
            return None
        return inst

    def _replica(self, kv: KeyValue, into: dict[str, dict[str, object]]) -> None:
        try:
            data = json.loads(kv.value)
        except ValueError:
            return
        if isinstance(data, dict):
            into[kv.key[len(self.keys.replicas):].decode(errors="replace")] = data

    def status(self) -> dict[str, object]:
        return {"store": self.client.where, "prefix": self.keys.prefix, "listed": self.listed,
                "watching": self.connected, "revision": self.revision, "relists": self.relists,
                "mesh_revision": self.mesh.mod_revision if self.mesh is not None else None,
                "last_error": self.last_error, "at": time.time()}
