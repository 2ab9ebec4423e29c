"""The etcd client against a real etcd: compare-and-swap, create-once, leases, watch, compaction,
and a clear error naming etcd when it cannot answer."""

from __future__ import annotations

import asyncio

import pytest
from aetcd import rpc

from tests.support.etcd import EtcdCluster, etcd_single  # noqa: F401 - fixture
from xdsd.store.etcd import Compacted, EtcdClient, StoreUnavailable
from xdsd.store.spec import StoreSpec, parse_endpoints


def _client(cluster: EtcdCluster, timeout: float = 3.0) -> EtcdClient:
    return EtcdClient(StoreSpec("etcd", parse_endpoints(cluster.store_url), "/t"), timeout=timeout)


async def test_swap_create_and_list(etcd_single: EtcdCluster) -> None:  # noqa: F811
    c = _client(etcd_single)
    try:
        assert await c.create(b"/t/k", b"first") == b"first"
        assert await c.create(b"/t/k", b"second") == b"first"  # never overwritten
        kv = await c.get(b"/t/k")
        assert kv is not None and kv.value == b"first"
        done, rev = await c.swap(b"/t/k", b"v2", kv.mod_revision)
        assert done and rev > kv.mod_revision
        done, current = await c.swap(b"/t/k", b"v3", kv.mod_revision)  # stale base: refused
        assert not done and current == rev
        revision, kvs = await c.list(b"/t/")
        assert revision >= rev and [x.value for x in kvs] == [b"v2"]
    finally:
        await c.close()


async def test_lease_expires_key_and_watch_sees_it(etcd_single: EtcdCluster) -> None:  # noqa: F811
    c = _client(etcd_single)
    try:
        start, _ = await c.list(b"/t/")
        lease = await c.grant(2)
        await c.put(b"/t/leased", b"x", lease)
        assert await c.keepalive(lease) > 0
        seen: list[tuple[bool, bytes]] = []

        async def follow() -> None:
            async for batch in c.watch(b"/t/", start + 1):
                seen.extend((e.deleted, e.kv.key) for e in batch)
                if any(d for d, _ in seen):
                    return

        await asyncio.wait_for(follow(), 20)
        assert seen[0] == (False, b"/t/leased") and seen[-1] == (True, b"/t/leased")
        assert await c.keepalive(lease) == 0  # gone
    finally:
        await c.close()


async def test_watch_from_compacted_revision_raises(etcd_single: EtcdCluster) -> None:  # noqa: F811
    c = _client(etcd_single)
    try:
        first = await c.put(b"/t/a", b"1")
        last = await c.put(b"/t/a", b"2")
        await c._call(rpc.KVStub, "Compact", rpc.CompactionRequest(revision=last, physical=True))
        with pytest.raises(Compacted):
            async for _ in c.watch(b"/t/", first):
                pass
    finally:
        await c.close()


async def test_unreachable_etcd_is_named(etcd_single: EtcdCluster) -> None:  # noqa: F811
    etcd_single.stop()
    c = _client(etcd_single, timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="etcd 127.0.0.1"):
            await c.put(b"/t/x", b"1")
    finally:
        await c.close()
