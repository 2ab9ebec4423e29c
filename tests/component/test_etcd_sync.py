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
from xdsd.registry.instance import Instance, RegistrationError
from xdsd.registry.registry import QuotaExceeded, Registry
from xdsd.registry.store import MemoryStore
from xdsd.store.etcd import EtcdClient
from xdsd.store.keys import Keys
from xdsd.store.registrations import EtcdRegistrations
from xdsd.store.spec import StoreSpec, parse_endpoints
from xdsd.store.sync import EtcdSync


class View:
    def __init__(self, cluster: EtcdCluster, state: Path, timeout: float = 3.0, **limits: int) -> None:
        self.client = EtcdClient(StoreSpec("etcd", parse_endpoints(cluster.store_url), "/m"), timeout=timeout)
        self.keys = Keys("/m")
        self.registry = Registry(MemoryStore(), drain_seconds=2, expire_locally=False, **limits)
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


def other(instance_id: str, port: int, address: str = "127.0.0.2", ttl: float = 10) -> dict[str, object]:
    return {"service": "reviews", "instance_id": instance_id, "address": address, "port": port, "ttl": ttl}


async def test_an_address_is_one_instances_across_replicas(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    a, b = await View(etcd_single, tmp_path / "a").start(), await View(etcd_single, tmp_path / "b").start()
    try:
        # Two registrations of one address through two views at once: exactly one is taken.
        for n in range(5):
            port = 9000 + n
            results = await asyncio.gather(a.ops.register(reg(f"a{n}", port)), b.ops.register(reg(f"b{n}", port)),
                                           return_exceptions=True)
            taken = [r for r in results if isinstance(r, Instance)]
            refused = [r for r in results if isinstance(r, RegistrationError)]
            assert len(taken) == 1 and len(refused) == 1, results
            assert refused[0].errors[0].path == "address" and "already registered as reviews/" in str(refused[0])
            await until(lambda: a.ids() == b.ids(), "the views to agree")
        assert len(a.ids()) == 5
        # A view that has not seen a registration (its watch stopped) is refused by etcd all the same,
        # with the error a single replica gives; another spelling of the address is the same address.
        await b.pause()
        await a.ops.register(other("v6", 8100, address="::1"))
        with pytest.raises(RegistrationError, match=r"address: ::1:8100 is already registered as reviews/v6"):
            await b.ops.register(other("x", 8100, address="0:0::0001"))
        # The instance itself re-registers through either view (same id, same address).
        again = await b.ops.register(other("v6", 8100, address="::1", ttl=20))
        assert again.ttl == 20
        await a.ops.register(other("v6", 8100, address="::1", ttl=30))
        b.task = asyncio.ensure_future(b.sync.follow(b.stop))
        # Moving to another address releases the old one at once (its lease is revoked).
        await b.ops.register(other("v6", 8101, address="::1"))
        await until(lambda: a.registry.get("reviews", "v6").port == 8101, "a to see v6 move")
        for _ in range(100):  # the old lease is revoked in the background
            with contextlib.suppress(RegistrationError):
                await a.ops.register(other("y", 8100, address="::1"))
                break
            await asyncio.sleep(0.1)
        assert "y" in a.ids()
        # Deregistering holds the address while draining (2 s), then frees it; so does expiry.
        await a.ops.deregister("reviews", "y")
        with pytest.raises(RegistrationError, match="address"):
            await b.ops.register(other("z", 8100, address="::1"))
        await until(lambda: "y" not in a.ids() and "y" not in b.ids(), "y drained", 20)
        await b.ops.register(other("z", 8100, address="::1", ttl=2))
        await until(lambda: "z" not in a.ids() and "z" not in b.ids(), "z expired", 20)
        await a.ops.register(other("w", 8100, address="::1"))
    finally:
        await a.close()
        await b.close()


async def test_listing_shows_the_expiry_heartbeats_gave_through_another_view(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    a, b = await View(etcd_single, tmp_path / "a").start(), await View(etcd_single, tmp_path / "b").start()
    try:
        first = await a.ops.register(reg("i1", 8001, ttl=3))
        await until(lambda: b.ids() == {"i1"}, "b to see i1")
        for _ in range(6):  # 3 s of heartbeats through a: no write, so b's copy keeps the first expiry
            await a.ops.heartbeat("reviews", "i1")
            await asyncio.sleep(0.5)
        await a.ops.heartbeat("reviews", "i1")
        assert b.registry.get("reviews", "i1").expires_at == first.expires_at
        [seen] = await b.ops.listed("reviews")
        # The lease was refreshed just now: its expiry is at least ~2 s (whole seconds) past the first.
        assert seen.expires_at >= first.expires_at + 2, (seen.expires_at, first.expires_at)
        assert seen.instance_id == "i1" and seen.state == "ACTIVE"
    finally:
        await a.close()
        await b.close()


async def test_quotas_hold_across_replicas(etcd_single: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    limits = {"max_per_service": 3, "max_per_token": 2}
    a = await View(etcd_single, tmp_path / "a", **limits).start()
    b = await View(etcd_single, tmp_path / "b", **limits).start()
    try:
        await b.pause()  # b does not see what a takes: only etcd can refuse
        await a.ops.register(reg("i1", 8001))
        await a.ops.register(reg("i2", 8002))
        await b.ops.register(reg("j1", 8003))  # the third
        with pytest.raises(QuotaExceeded, match="service: reviews has 3 registered instances"):
            await b.ops.register(reg("j2", 8004))
        assert await b.client.count(b.keys.service("reviews")) == 3  # j2 was undone
        await b.ops.register(reg("j1", 8003, ttl=20))  # re-registering is not a new instance
        # Two new instances at once through two views, one place left: exactly one stays.
        await a.ops.deregister("reviews", "i2")
        await until(lambda: "i2" not in a.ids(), "i2 drained", 20)
        b.task = asyncio.ensure_future(b.sync.follow(b.stop))
        await until(lambda: b.ids() == a.ids() == {"i1", "j1"}, "the views to agree")
        results = await asyncio.gather(a.ops.register(reg("k1", 8005)), b.ops.register(reg("k2", 8006)),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["Instance", "QuotaExceeded"], results
        await until(lambda: len(a.ids()) == len(b.ids()) == 3 and a.ids() == b.ids(), "three instances everywhere")
        # Per token, across services and views.
        await b.pause()
        other = {"service": "ratings", "address": "127.0.0.3", "ttl": 10}
        await a.ops.register({**other, "instance_id": "t1", "port": 9001}, "tok")
        await b.ops.register({**other, "instance_id": "t2", "port": 9002}, "tok")
        with pytest.raises(QuotaExceeded, match="token: this token \\(id tok\\) has registered 2 instances"):
            await b.ops.register({**other, "instance_id": "t3", "port": 9003}, "tok")
        await b.ops.register({**other, "instance_id": "t3", "port": 9003}, "another")
    finally:
        await a.close()
        await b.close()
