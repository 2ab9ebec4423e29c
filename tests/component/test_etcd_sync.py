"""A replica's view of etcd (EtcdSync + EtcdRegistrations) against a real etcd: two views of one
prefix converge; registrations are on leases; a watch that falls behind a compaction lists again and
converges; a write without etcd fails naming etcd and changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from aetcd import rpc

from tests.support.etcd import EtcdCluster, etcd_single  # noqa: F401 - fixture
from xdsd.errors import StoreUnavailable
from xdsd.registry.registry import Registry
from xdsd.registry.store import MemoryStore
from xdsd.store.etcd import EtcdClient
from xdsd.store.keys import Keys
from xdsd.store.registrations import EtcdRegistrations
from xdsd.store.spec import StoreSpec, parse_endpoints
from xdsd.store.sync import EtcdSync


class View:
    def __init__(self, cluster: EtcdCluster, state: Path, timeout: float = 3.0) -> None:
        self.client = EtcdClient(StoreSpec("etcd", parse_endpoints(cluster.store_url), "/m"), timeout=timeout)
        self.keys = Keys("/m")
        self.registry = Registry(MemoryStore(), drain_seconds=2, expire_locally=False)
        self.meshes: list[tuple[bytes, int]] = []
        state.mkdir(parents=True, exist_ok=True)
        self.sync = EtcdSync(self.client, self.keys, self.registry, state, lambda c, r: self.meshes.append((c, r)))
        self.ops = EtcdRegistrations(self.registry, self.client, self.keys, self.sync)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> View:
        await self.sync.load()
        self.task = asyncio.ensure_future(self.sync.follow(self.stop))
        return self

    async def pause(self) -> None:
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.stop = asyncio.Event()

    async def close(self) -> None:
        await self.pause()
        await self.client.close()

    def ids(self) -> set[str]:
        return {i.instance_id for i in self.registry.list()}


async def until(check: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def reg(instance_id: str, port: int, ttl: float = 10) -> dict[str, object]:
    return {"service": "reviews", "instance_id": instance_id, "address": "127.0.0.2", "port": port, "ttl": ttl}


async def test_two_views_converge_and_leases_expire(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    a, b = await View(etcd_single, tmp_path / "a").start(), await View(etcd_single, tmp_path / "b").start()
    try:
        await a.ops.register(reg("i1", 8001, ttl=2))
        await until(lambda: b.ids() == {"i1"}, "b to see a's registration")
        # Heartbeats through b keep a's registration (its lease) alive past its TTL.
        for _ in range(6):
            await b.ops.heartbeat("reviews", "i1")
            await asyncio.sleep(0.5)
        assert a.ids() == b.ids() == {"i1"}
        # Without heartbeats the lease ends and both views drop it.
        await until(lambda: not a.ids() and not b.ids(), "the lease to expire everywhere", 20)
        # Deregistering through b: DRAINING everywhere, then gone after the drain time.
        await a.ops.register(reg("i2", 8002))
        await until(lambda: b.ids() == {"i2"}, "b to see i2")
        await b.ops.deregister("reviews", "i2")
        await until(lambda: a.registry.get("reviews", "i2").state == "DRAINING", "a to see i2 draining")
        await until(lambda: not a.ids() and not b.ids(), "i2 gone after draining", 20)
    finally:
        await a.close()
        await b.close()


async def test_compaction_past_the_watch_lists_again_and_converges(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    a, b = await View(etcd_single, tmp_path / "a").start(), await View(etcd_single, tmp_path / "b").start()
    try:
        await a.ops.register(reg("keep", 8001))
        await a.ops.register(reg("goes", 8002))
        await until(lambda: b.ids() == {"keep", "goes"}, "b to see both")
        await b.pause()  # b stops watching: it falls behind
        await a.ops.deregister("reviews", "goes")
        await a.ops.register(reg("new", 8003))
        await a.client.revoke(a.sync.leases[("reviews", "goes")])  # gone now, not after draining
        last = await a.client.put(b"/m/mesh", b"services: {}\n")
        await a.client._call(rpc.KVStub, "Compact", rpc.CompactionRequest(revision=last, physical=True))
        b.task = asyncio.ensure_future(b.sync.follow(b.stop))
        await until(lambda: b.sync.relists >= 1, "b to list again after the compaction")
        await until(lambda: b.ids() == a.ids() == {"keep", "new"}, "b to converge")
        assert b.meshes[-1][0] == b"services: {}\n"
    finally:
        await a.close()
        await b.close()


async def test_write_without_etcd_fails_naming_it_and_changes_nothing(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    a = await View(etcd_single, tmp_path / "a", timeout=1.0).start()
    try:
        await a.ops.register(reg("i1", 8001))
        etcd_single.stop()
        with pytest.raises(StoreUnavailable, match="etcd"):
            await a.ops.register(reg("i2", 8002))
        with pytest.raises(StoreUnavailable, match="etcd"):
            await a.ops.heartbeat("reviews", "i1")
        assert a.ids() == {"i1"}  # i2 not admitted; i1 not dropped for a heartbeat that was not stored
        a.registry.sweep()
        assert a.ids() == {"i1"}
    finally:
        await a.close()
