"""Snapshots built against the previous one (patching what changed) equal snapshots built from
scratch: same resources, same versions, same consistency errors."""

from __future__ import annotations

import random

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from xdsd import typeurls
from xdsd.cache.snapshot import Encoder, InconsistentSnapshot, Snapshot
from xdsd.generators import NodeGroup

GROUP = NodeGroup("edge")


def _cluster(name: str, timeout: int) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout
    return c


def _cla(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address.port_value = port
    return cla


def _view(snap: Snapshot) -> dict[str, tuple[str, dict[str, bytes]]]:
    return {t: (ts.version, {n: r.body for n, r in ts.resources.items()}) for t, ts in snap.types.items()}


@pytest.mark.parametrize("seed", range(5))
def test_incremental_builds_equal_builds_from_scratch(seed: int) -> None:
    rnd = random.Random(seed)
    names = [f"svc-{i}" for i in range(40)]
    clusters = {n: _cluster(n, 1) for n in names}
    clas = {n: _cla(n, 80) for n in names}
    enc = Encoder()
    previous: Snapshot | None = None
    for step in range(60):
        op = rnd.randrange(4)
        n = rnd.choice(names)
        if op == 0:
            clas[n] = _cla(n, rnd.randrange(1000))  # an endpoint change: a new message object
        elif op == 1:
            clusters[n] = _cluster(n, rnd.randrange(1, 9))
        elif op == 2 and len(clusters) > 1:
            clusters.pop(n, None)  # a cluster goes (its assignment stays: still consistent)
        else:
            clusters[n] = clusters.get(n) or _cluster(n, 1)
            clas[n] = clas.get(n) or _cla(n, 80)
        generated = {typeurls.CLUSTER: [clusters[k] for k in sorted(clusters)],
                     typeurls.ENDPOINT: [clas[k] for k in sorted(clas)]}
        snap = Snapshot.build(GROUP, step, generated, enc, previous)
        scratch = Snapshot.build(GROUP, step, {t: list(v) for t, v in generated.items()})
        assert _view(snap) == _view(scratch), step
        assert snap.get(typeurls.CLUSTER).eds_names == scratch.get(typeurls.CLUSTER).eds_names
        previous = snap
        enc.sweep()


def test_a_patched_snapshot_still_refuses_inconsistency() -> None:
    a, b = _cluster("a", 1), _cluster("b", 1)
    first = Snapshot.build(GROUP, 1, {typeurls.CLUSTER: [a, b], typeurls.ENDPOINT: [_cla("a", 1), _cla("b", 1)]})
    with pytest.raises(InconsistentSnapshot):
        # Same length, one position changed: the EDS cluster "c" has no assignment.
        Snapshot.build(GROUP, 2, {typeurls.CLUSTER: [a, _cluster("c", 1)],
                                  typeurls.ENDPOINT: first.sources[typeurls.ENDPOINT]}, previous=first)
    with pytest.raises(ValueError, match="duplicate"):
        Snapshot.build(GROUP, 2, {typeurls.CLUSTER: [a, _cluster("a", 2)],
                                  typeurls.ENDPOINT: first.sources[typeurls.ENDPOINT]}, previous=first)
