"""The shared memo and encoder: reusing generated resources across groups and revisions must give
exactly what generating from scratch gives, and must not rebuild what did not change."""

from __future__ import annotations

from bench.meshgen import mesh as bench_mesh
from bench.meshgen import service_name
from xdsd import typeurls
from xdsd.ca import Credentials
from xdsd.cache import SnapshotCache
from xdsd.generators import MeshGenerator, NodeGroup, generate
from xdsd.model import Mesh


def _cache() -> SnapshotCache:
    cache = SnapshotCache(MeshGenerator(lambda: Credentials()))
    return cache


def _change_endpoint(m: Mesh, name: str, port: int) -> Mesh:
    svc = m.services[name]
    eps = list(svc.endpoints)
    eps[0] = eps[0].model_copy(update={"port": port})
    return m.model_copy(update={"services": {**m.services, name: svc.model_copy(update={"endpoints": eps})}})


def _bytes(cache: SnapshotCache, group: NodeGroup) -> dict[str, dict[str, bytes]]:
    snap = cache.snapshot(group)
    assert snap is not None
    return {t: {n: r.body for n, r in ts.resources.items()} for t, ts in snap.types.items()}


def test_memoized_generation_equals_generation_from_scratch() -> None:
    m = Mesh.model_validate(bench_mesh(20, 3, upstreams=4))
    groups = [NodeGroup(cluster=n) for n in m.services]
    memoized = _cache()
    for g in groups:
        memoized.watch(g, lambda s, t: None)
    memoized.update(m)
    for port in (9001, 9002, 9001):
        m = _change_endpoint(m, service_name(0), port)
        changed = memoized.update(m)
        # Every sidecar calls the hot service: all of them see exactly one EDS change.
        assert {t for types in changed.values() for t in types} == {typeurls.ENDPOINT}
        assert len(changed) == len(groups) - 1
        scratch = SnapshotCache(generate)
        scratch.update(m)
        for g in groups:
            assert _bytes(memoized, g) == _bytes(scratch, g)


def test_an_endpoint_change_rebuilds_one_assignment_for_all_groups() -> None:
    m = Mesh.model_validate(bench_mesh(20, 3, upstreams=4))
    cache = _cache()
    groups = [NodeGroup(cluster=n) for n in m.services]
    for g in groups:
        cache.watch(g, lambda s, t: None)
    cache.update(m)
    before = {g: cache.snapshot(g) for g in groups}
    misses = cache.memo.misses
    cache.update(_change_endpoint(m, service_name(0), 9001))
    # One ClusterLoadAssignment, shared by 19 groups (plus, for the changed service object, the
    # EDS-or-DNS decision and its policy tuple, which compares equal: nothing else is rebuilt).
    assert cache.memo.misses - misses == 3
    hot = {id(cache.snapshot(g).get(typeurls.ENDPOINT).resources[service_name(0)]) for g in groups[1:]}  # type: ignore[union-attr]
    assert len(hot) == 1  # one serialized resource for every group
    for g in groups[1:]:
        now, old = cache.snapshot(g), before[g]
        assert now is not None and old is not None
        # Unchanged types keep their snapshot objects (nothing rebuilt, nothing to compare).
        for t in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
            assert now.get(t) is old.get(t)


def test_memoized_policy_edits_equal_generation_from_scratch() -> None:
    """Routes, subsets and splits depend on other services' policies: edits to any of them (and to
    endpoints) must reach every group exactly as a from-scratch generation would."""
    from tests.unit.test_generators import POLICY_MESH
    from xdsd.model import load_mesh

    m = load_mesh(POLICY_MESH)
    groups = [NodeGroup("edge", zone="zone-a"), NodeGroup("edge"), NodeGroup("shop")]
    memoized = _cache()
    for g in groups:
        memoized.watch(g, lambda s, t: None)
    memoized.update(m)
    edits = [
        ("ratings", {"timeout": 7.0}),
        ("reviews", {"retries": None}),
        ("ratings", {"load_balancer": None}),
        ("reviews", {"endpoints": list(m.services["reviews"].endpoints[:2])}),
    ]
    for name, update in edits:
        m = m.model_copy(update={"services": {**m.services, name: m.services[name].model_copy(update=update)}})
        memoized.update(m)
        scratch = SnapshotCache(generate)
        scratch.update(m)
        for g in groups:
            assert _bytes(memoized, g) == _bytes(scratch, g), (name, update, g)
