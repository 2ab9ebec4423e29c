"""Registrations change endpoints only: the cache then patches the last snapshots (what the
changed services feed) instead of generating every group again. Whatever the sequence of
registrations, deregistrations and file edits, every group's snapshot must equal a generation from
scratch: same resources, same bytes, same versions, same EDS names."""

from __future__ import annotations

import random

import pytest
import yaml

from xdsd import typeurls
from xdsd.ca import Credentials
from xdsd.cache import SnapshotCache
from xdsd.generators import MeshGenerator, NodeGroup, assemble
from xdsd.generators import patch as patch_module
from xdsd.model import Mesh, load_mesh
from xdsd.registry.instance import Instance
from xdsd.registry.merge import Merger

BASE = """
telemetry:
  stats: {port: 15090}
services:
  reviews:
    endpoints:
      - {address: 10.0.0.1, port: 8080, zone: zone-a, labels: {version: v1}}
      - {address: 10.0.0.2, port: 8080, zone: zone-b, labels: {version: v1}}
      - {address: 10.0.0.3, port: 8080, zone: zone-a, labels: {version: v2}}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    routes:
      - {prefix: /, headers: {x-canary: "yes"}, subset: v2}
  ratings:
    endpoints: [{address: ratings.internal, port: 80, zone: zone-b}]
  empty: {}
  shop:
    sidecar:
      inbound: {address: 10.0.9.1, port: 15006}
      app_port: 9080
      upstreams: {reviews: 9081, ratings: 9082, big: 9083}
  caller:
    sidecar:
      inbound: {port: 15006}
      app_port: 9080
      upstreams: {empty: 9081, shop: 9082}
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {prefix: /ratings, service: ratings}
      - {prefix: /big, service: big}
      - {prefix: /empty, service: empty}
      - {prefix: /shop, service: shop}
      - {prefix: /, split: [{service: reviews, subset: v1, weight: 90}, {service: reviews, subset: v2, weight: 10}]}
"""

GROUPS = [NodeGroup("edge"), NodeGroup("edge", zone="zone-a"), NodeGroup("shop"), NodeGroup("shop", zone="zone-b"),
          NodeGroup("caller", inbound_address="10.0.9.2"), NodeGroup("nobody")]
SERVICES = ["reviews", "ratings", "big", "empty", "shop"]


def _file_mesh(big: int = 300, timeout: str = "1s", telemetry: bool = True) -> Mesh:
    data = yaml.safe_load(BASE)
    # Big enough for the incremental encoder (generators.encoded: >= 256 endpoints).
    data["services"]["big"] = {
        "endpoints": [{"address": f"10.1.{i // 250}.{i % 250 + 1}", "port": 80, "zone": "zone-a" if i % 3 else "zone-b",
                       "labels": {"version": "v1" if i % 2 else "v2"}} for i in range(big)],
        "connect_timeout": timeout,
    }
    if not telemetry:
        del data["telemetry"]
    return load_mesh(yaml.safe_dump(data))


def _scratch(mesh: Mesh, credentials: Credentials) -> SnapshotCache:
    """Generated from nothing (a fresh memo: large assignments are versioned by the same chunked
    digest as in the served cache)."""
    scratch = SnapshotCache(MeshGenerator(lambda: credentials))
    scratch.update(mesh)
    return scratch


def _view(cache: SnapshotCache, group: NodeGroup) -> dict[str, object]:
    snap = cache.snapshot(group)
    assert snap is not None
    return {t: (ts.version, ts.eds_names, {n: r.body for n, r in ts.resources.items()}) for t, ts in snap.types.items()}


def _instance(rnd: random.Random, n: int) -> Instance:
    service = rnd.choice(SERVICES)
    port = 15006 if service == "shop" else 80
    # Mostly IPs; sometimes a host name, which turns the service into a STRICT_DNS cluster.
    address = f"host-{n}.internal" if rnd.random() < 0.1 else f"10.2.{n // 250}.{n % 250 + 1}"
    return Instance(service=service, instance_id=f"i-{n}", address=address, port=port, weight=rnd.randint(1, 3),
                    zone=rnd.choice([None, "zone-a", "zone-b"]), labels={"version": rnd.choice(["v1", "v2", "v3"])},
                    state="ACTIVE", expires_at=1e12)


@pytest.mark.parametrize("seed", range(6))
def test_patched_snapshots_equal_snapshots_from_scratch(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    patched = 0
    real_patch = assemble.patch

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal patched
        out = real_patch(*args, **kwargs)
        patched += out is not None
        return out

    monkeypatch.setattr(assemble, "patch", counting)
    credentials = Credentials()  # one object, as IdentityStore hands out between rotations
    cache = SnapshotCache(MeshGenerator(lambda: credentials))
    for g in GROUPS:
        cache.watch(g, lambda snap, types: None)
    merger = Merger()
    file_mesh = _file_mesh(big=300 if seed % 2 else 260, telemetry=seed % 3 != 0)
    instances: dict[str, Instance] = {}
    for step in range(60):
        op = rnd.random()
        if op < 0.45 or not instances:
            inst = _instance(rnd, step)
            instances[inst.instance_id] = inst
        elif op < 0.65:
            del instances[rnd.choice(sorted(instances))]
        elif op < 0.8:
            key = rnd.choice(sorted(instances))
            old = instances[key]
            instances[key] = Instance(**{**old.as_json(), "state": "DRAINING" if old.state == "ACTIVE" else "ACTIVE"})
        elif op < 0.9:
            pass  # the same registrations again (a heartbeat flush): nothing changes
        else:
            file_mesh = _file_mesh(big=rnd.choice([260, 300]), timeout=rnd.choice(["1s", "2s"]),
                                   telemetry=rnd.random() < 0.5)
        mesh = merger.merge(file_mesh, sorted(instances.values(), key=lambda i: i.instance_id))
        cache.update(mesh, hint=merger.endpoints_changed)
        scratch = _scratch(mesh, credentials)
        for g in GROUPS:
            assert _view(cache, g) == _view(scratch, g), (step, g)
    assert patched > 10  # the incremental path was taken (not only full generations)


def test_a_registration_touches_only_what_the_service_feeds() -> None:
    credentials = Credentials()
    cache = SnapshotCache(MeshGenerator(lambda: credentials))
    for g in GROUPS:
        cache.watch(g, lambda snap, types: None)
    merger = Merger()
    file_mesh = _file_mesh()
    cache.update(merger.merge(file_mesh, []))
    before = {g: cache.snapshot(g) for g in GROUPS}
    inst = Instance(service="reviews", instance_id="r", address="10.3.0.1", port=80, labels={"version": "v2"})
    mesh = merger.merge(file_mesh, [inst])
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == {"reviews"}
    misses = cache.memo.misses
    changed = cache.update(mesh, hint=merger.endpoints_changed)
    # The assignments of the clusters reviews feeds, once per zone: the edge's reviews~v1 and ~v2
    # (no zone, zone-a), the shop's reviews and reviews~v2 (no zone, zone-b; reviews~v2 without a
    # zone is the edge's), plus the service's EDS-or-DNS decision. Nothing else is built again.
    assert cache.memo.misses - misses == 4 + 3 + 1
    assert set(changed) == {g for g in GROUPS if g.cluster in ("edge", "shop")}
    assert all(types == {typeurls.ENDPOINT} for types in changed.values())
    for g in GROUPS:
        now, old = cache.snapshot(g), before[g]
        assert now is not None and old is not None
        if g not in changed:
            assert now is old
            continue
        ts, old_ts = now.get(typeurls.ENDPOINT), old.get(typeurls.ENDPOINT)
        # The lineage streams use: a client up to date with the old one need look at these only.
        assert ts.since(old_ts) == ({"reviews~v1", "reviews~v2"} if g.cluster == "edge" else {"reviews", "reviews~v2"})
        assert now.get(typeurls.CLUSTER) is old.get(typeurls.CLUSTER)


def test_a_service_turning_to_dns_regenerates_in_full_and_stays_consistent() -> None:
    credentials = Credentials()
    cache = SnapshotCache(MeshGenerator(lambda: credentials))
    cache.watch(NodeGroup("edge"), lambda snap, types: None)
    merger = Merger()
    file_mesh = _file_mesh()
    cache.update(merger.merge(file_mesh, []))
    inst = Instance(service="reviews", instance_id="r", address="reviews.internal", port=80)
    mesh = merger.merge(file_mesh, [inst])
    changed = cache.update(mesh, hint=merger.endpoints_changed)
    assert changed[NodeGroup("edge")] == {typeurls.CLUSTER, typeurls.ENDPOINT}
    snap = cache.snapshot(NodeGroup("edge"))
    assert snap is not None
    assert "reviews~v1" not in snap.get(typeurls.ENDPOINT).resources
    assert "reviews~v1" not in snap.get(typeurls.CLUSTER).eds_names


def test_the_hint_is_ignored_unless_it_is_relative_to_the_mesh_being_served() -> None:
    credentials = Credentials()
    cache = SnapshotCache(MeshGenerator(lambda: credentials))
    cache.watch(NodeGroup("edge"), lambda snap, types: None)
    merger = Merger()
    file_mesh = _file_mesh()
    first = merger.merge(file_mesh, [])
    inst = Instance(service="reviews", instance_id="r", address="10.3.0.1", port=80, labels={"version": "v2"})
    second = merger.merge(file_mesh, [inst])  # relative to ``first``, which the cache never served
    cache.update(_file_mesh(timeout="2s"))
    cache.update(second, hint=merger.endpoints_changed)
    scratch = _scratch(second, credentials)
    assert merger.endpoints_changed is not None and merger.endpoints_changed[0] is first
    assert _view(cache, NodeGroup("edge")) == _view(scratch, NodeGroup("edge"))


def test_an_all_eds_gateway_finds_what_a_service_feeds_by_bisection() -> None:
    names = [f"svc-{i:02d}" for i in range(50)]
    data = {"services": {n: {"endpoints": [{"address": f"10.4.{i}.1", "port": 80, "labels": {"v": "1"}},
                                           {"address": f"10.4.{i}.2", "port": 80, "labels": {"v": "2"}}],
                             "subsets": {"one": {"v": "1"}, "two": {"v": "2"}} if i % 7 == 0 else {}}
                         for i, n in enumerate(names)},
            "gateways": {"edge": {"listen": {"address": "127.0.0.1", "port": 10000},
                                  "routes": [{"prefix": f"/{n}", "service": n, **({"subset": "two"} if i % 7 == 0 else {})}
                                             for i, n in enumerate(names)]
                                  # services with several clusters: the whole service and two subsets
                                  + [{"prefix": f"/{n}/{sub}", "service": n, **({"subset": sub} if sub else {})}
                                     for i, n in enumerate(names) if i % 7 == 0 for sub in ("one", None)]}}}
    file_mesh = load_mesh(yaml.safe_dump(data))
    credentials = Credentials()
    cache = SnapshotCache(MeshGenerator(lambda: credentials))
    cache.watch(NodeGroup("edge"), lambda snap, types: None)
    merger = Merger()
    cache.update(merger.merge(file_mesh, []))
    rnd = random.Random(7)
    instances: list[Instance] = []
    for step in range(25):
        service = rnd.choice(names)
        instances.append(Instance(service=service, instance_id=f"i{step}", address=f"10.5.0.{step + 1}", port=80,
                                  labels={"v": rnd.choice(["1", "2"])}))
        mesh = merger.merge(file_mesh, instances)
        cache.update(mesh, hint=merger.endpoints_changed)
        assert _view(cache, NodeGroup("edge")) == _view(_scratch(mesh, credentials), NodeGroup("edge")), step
    last = cache.memo.last(("generated", NodeGroup("edge")))
    assert isinstance(last, patch_module.Generated) and isinstance(last.where, patch_module._SortedTargets)
