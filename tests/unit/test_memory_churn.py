"""Memory stays flat under churn (issue 19, item 5): registrations, heartbeats and expiries through a
steady live set, with node groups watched, keep no more than the live set needs.

The pieces are the real ones (Registry, Controller, SnapshotCache with MeshGenerator and an
IdentityStore, so registrations are patched as in ``xdsd serve``), driven in-process by a fake
clock; the soak benchmark (bench/soak.py) measures the same thing with streams and RSS."""

from __future__ import annotations

import datetime as dt
import gc
import tracemalloc
from pathlib import Path

import yaml

from bench import meshgen
from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.cache import SnapshotCache
from xdsd.cache.inputs import Patched
from xdsd.controller import Controller
from xdsd.generators import MeshGenerator, NodeGroup
from xdsd.observability.metrics import Metrics
from xdsd.registry.registry import Registry
from xdsd.registry.store import MemoryStore
from xdsd.sources.file import FileSource

RATE = 16  # registrations per (fake) second, as bench.soak
IDS = 1000  # instance ids cycle through these
TTL = "3s"


class _Churn:
    """bench.soak's load without HTTP: one registration every 1/RATE s (ids cycling through IDS,
    TTL 3 s), a heartbeat for every other instance a second later, and the registry's sweep."""

    def __init__(self, tmp: Path, services: int = 10, upstreams: int = 3) -> None:
        m = meshgen.mesh(services, 2, upstreams=upstreams)
        (tmp / "mesh.yaml").write_text(yaml.safe_dump(m))
        self.now = 1_000_000.0
        self.registry = Registry(MemoryStore(), drain_seconds=0.2, clock=lambda: self.now)
        ids = IdentityStore(CertificateAuthority.load_or_create(tmp, "mesh"), dt.timedelta(hours=1))
        self.cache = SnapshotCache(MeshGenerator(lambda: ids.credentials))
        self.controller = Controller(FileSource(tmp / "mesh.yaml"), self.cache, Metrics(), ids, registry=self.registry)
        self.groups = [NodeGroup(s) for s in meshgen.client_services(m)]
        for g in self.groups:
            self.cache.watch(g, lambda snap, types: None)
        assert self.controller.reload()
        self.services = sorted(m["services"])
        self.k = 0

    def run(self, registrations: int) -> None:
        services, reg = self.services, self.registry
        for k in range(self.k, self.k + registrations):
            self.now += 1 / RATE
            reg.register({"service": services[k % len(services)], "instance_id": f"soak-{k % IDS}",
                          "address": f"10.250.{k % IDS // 250}.{k % 250 + 1}", "port": meshgen.INBOUND_PORT,
                          "ttl": TTL})
            back = k - RATE
            if back >= 0 and back % 2 == 0:
                reg.heartbeat(services[back % len(services)], f"soak-{back % IDS}")
            reg.sweep()
        self.k += registrations


def _traced_after_collect() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_churn_through_a_steady_live_set_keeps_memory_flat(tmp_path: Path) -> None:
    """2,000 registrations after a warm-up through all 1,000 ids: what is traced afterwards is what
    was traced before, within noise. (Before the fix, each registration kept ~0.5-2 KB: megabytes.)"""
    churn = _Churn(tmp_path)
    churn.run(IDS)  # warm-up: every id used, every group patched, every lazy cache filled
    tracemalloc.start(1)
    try:
        churn.run(500)  # what the live set holds is now allocated under tracing too
        live = churn.registry.count()
        before = _traced_after_collect()
        churn.run(2000)
        after = _traced_after_collect()
    finally:
        tracemalloc.stop()
    assert 20 <= churn.registry.count() <= 80 and abs(churn.registry.count() - live) <= 30  # a steady live set
    assert churn.cache.revision > 3000
    grown = after - before
    # Noise: a few KB (dict resizes, the live set's own jitter); a leak of 100 bytes per
    # registration would be 200 KB.
    assert grown < 200_000, f"{grown / 1024:.0f} KiB kept over 2,000 registrations ({grown / 2000:.0f} B each)"


def test_a_patched_list_names_one_list_back_only(tmp_path: Path) -> None:
    """Each group's generated lists, patched at every registration, keep at most the list they
    were patched from: no chain of every earlier revision's lists (and the messages they held)."""
    churn = _Churn(tmp_path)
    churn.run(300)
    patched = 0
    for g in churn.groups:
        snap = churn.cache.current(g)
        assert snap is not None
        for msgs in snap.origins.values():
            depth, link = 0, msgs
            while isinstance(link, Patched) and link.base is not None:
                depth, link = depth + 1, link.base
            assert depth <= 1, (g, depth)
            patched += isinstance(msgs, Patched)
    assert patched > 0  # the churn did go through the patch
