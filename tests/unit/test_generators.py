"""Golden tests for the pure generators: the resources a node group receives for a mesh.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/unit/test_generators.py``
and review the diff like code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from xdsd import typeurls
from xdsd.cache import InconsistentSnapshot, Snapshot
from xdsd.generators import NodeGroup, Transport, generate
from xdsd.model import load_mesh

GOLDEN = Path(__file__).parent / "golden"

MESH = """
services:
  reviews:
    connect_timeout: 250ms
    endpoints:
      - {address: 10.0.0.1, port: 8080, weight: 3, zone: a}
      - {address: 10.0.0.2, port: 8080, weight: 1, zone: b}
  grpc-api:
    protocol: http2
    endpoints: [{address: 10.0.3.1, port: 9000}]
  legacy:
    endpoints: [{address: legacy.internal, port: 80}]
  unrouted:
    endpoints: [{address: 10.0.4.1, port: 80}]
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {prefix: /reviews, service: reviews}
      - {prefix: /api, service: grpc-api}
      - {prefix: /, service: legacy}
"""


def dump(group: NodeGroup) -> dict[str, list[dict[str, object]]]:
    out = generate(load_mesh(MESH), group)
    return {typeurls.short(t): [MessageToDict(m) for m in msgs] for t, msgs in out.items()}


@pytest.mark.parametrize("transport", list(Transport))
def test_gateway_resources_match_golden(transport: Transport) -> None:
    got = dump(NodeGroup("edge", transport))
    path = GOLDEN / f"gateway_edge_{transport}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def test_gateway_gets_only_the_services_it_routes_to() -> None:
    got = dump(NodeGroup("edge"))
    assert [c["name"] for c in got["CDS"]] == ["grpc-api", "legacy", "reviews"]
    # legacy has a host name: a STRICT_DNS cluster with inline endpoints, no EDS resource.
    assert [e["clusterName"] for e in got["EDS"]] == ["grpc-api", "reviews"]


def test_a_node_of_no_known_role_gets_empty_resources() -> None:
    got = dump(NodeGroup("stranger"))
    assert all(v == [] for v in got.values())


def test_generation_is_deterministic() -> None:
    a = Snapshot.build(NodeGroup("edge"), 1, generate(load_mesh(MESH), NodeGroup("edge")))
    b = Snapshot.build(NodeGroup("edge"), 2, generate(load_mesh(MESH), NodeGroup("edge")))
    assert {t: ts.version for t, ts in a.types.items()} == {t: ts.version for t, ts in b.types.items()}


def test_snapshot_refuses_an_eds_cluster_without_endpoints() -> None:
    out = generate(load_mesh(MESH), NodeGroup("edge"))
    out[typeurls.ENDPOINT] = []
    with pytest.raises(InconsistentSnapshot, match="without a ClusterLoadAssignment"):
        Snapshot.build(NodeGroup("edge"), 1, out)


def test_snapshot_refuses_a_listener_whose_routes_do_not_exist() -> None:
    out = generate(load_mesh(MESH), NodeGroup("edge"))
    out[typeurls.ROUTE] = []
    with pytest.raises(InconsistentSnapshot, match="references unknown routes"):
        Snapshot.build(NodeGroup("edge"), 1, out)


# Every traffic policy at once: the golden files show each one as Envoy gets it.
POLICY_MESH = """
services:
  reviews:
    endpoints:
      - {address: 10.0.0.1, port: 8080, zone: zone-a, labels: {version: v1}}
      - {address: 10.0.0.2, port: 8080, zone: zone-b, labels: {version: v1}}
      - {address: 10.0.0.3, port: 8080, zone: zone-a, labels: {version: v2}}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    retries: {attempts: 2}
    load_balancer: {policy: ring_hash, hash_on: {header: x-user}}
    outlier_detection: {consecutive_5xx: 3, interval: 1s, base_ejection_time: 5s, max_ejection_percent: 50}
    circuit_breakers: {max_connections: 100, max_pending_requests: 10, max_requests: 200, max_retries: 2}
    health_check: {path: /healthz, interval: 2s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 3}
    routes:
      - {prefix: /, headers: {x-canary: "yes"}, subset: v2}
      - {prefix: /, split: [{subset: v1, weight: 80}, {subset: v2, weight: 20}], fault: {delay: {duration: 100ms, percent: 0.5}}}
  ratings:
    endpoints: [{address: ratings.internal, port: 80, zone: zone-b}]
    load_balancer: {policy: least_request}
  shop:
    sidecar:
      inbound: {address: 10.0.9.1, port: 15006}
      app_port: 9080
      upstreams: {reviews: 9081}
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {path: /ratings, methods: [GET, HEAD], service: ratings, rewrite: {prefix: /v1/ratings, host: ratings.internal}}
      - {regex: "/items/[0-9]+", service: reviews, subset: v2, mirror: {service: ratings, percent: 10}}
      - {prefix: /faulty, service: ratings, fault: {abort: {status: 503, percent: 5}}, timeout: 2s}
      - {prefix: /, split: [{service: reviews, subset: v1, weight: 90}, {service: reviews, subset: v2, weight: 10}]}
"""


@pytest.mark.parametrize("group", [NodeGroup("edge", zone="zone-a"), NodeGroup("shop")], ids=["edge-zone-a", "sidecar"])
def test_traffic_policy_resources_match_golden(group: NodeGroup) -> None:
    out = generate(load_mesh(POLICY_MESH), group)
    Snapshot.build(group, 1, out)  # consistent: every subset cluster has its assignment, every route its cluster
    got = {typeurls.short(t): [MessageToDict(m) for m in msgs] for t, msgs in out.items() if t != typeurls.SECRET}
    path = GOLDEN / f"policy_{group.cluster}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def test_subset_clusters_and_zone_priorities() -> None:
    out = generate(load_mesh(POLICY_MESH), NodeGroup("edge", zone="zone-a"))
    assert [c.name for c in out[typeurls.CLUSTER]] == ["ratings", "reviews~v1", "reviews~v2"]
    cla = {c.cluster_name: c for c in out[typeurls.ENDPOINT]}
    v1 = {(e.locality.zone, e.priority): [h.endpoint.address.socket_address.address for h in e.lb_endpoints]
          for e in cla["reviews~v1"].endpoints}
    assert v1 == {("zone-a", 0): ["10.0.0.1"], ("zone-b", 1): ["10.0.0.2"]}
    # No endpoint of the subset in the node's zone: one priority (priorities start at 0).
    out = generate(load_mesh(POLICY_MESH), NodeGroup("edge", zone="zone-c"))
    assert {e.priority for c in out[typeurls.ENDPOINT] for e in c.endpoints} == {0}
    # A STRICT_DNS cluster carries its endpoints, with the same priorities.
    ratings = next(c for c in out[typeurls.CLUSTER] if c.name == "ratings")
    assert [e.priority for e in ratings.load_assignment.endpoints] == [0]


def test_the_sidecar_gets_the_subsets_its_upstreams_routes_use() -> None:
    out = generate(load_mesh(POLICY_MESH), NodeGroup("shop"))
    assert [c.name for c in out[typeurls.CLUSTER]] == ["inbound|9080|shop", "reviews", "reviews~v1", "reviews~v2"]
    (rc,) = out[typeurls.ROUTE]
    # The service's own routes (the last one catches everything: no default route after it).
    assert [r.route.cluster or "split" for r in rc.virtual_hosts[0].routes] == ["reviews~v2", "split"]
    mesh = load_mesh(POLICY_MESH.replace('{prefix: /, split', '{prefix: /v, split'))
    (rc,) = generate(mesh, NodeGroup("shop"))[typeurls.ROUTE]
    assert [r.route.cluster or "split" for r in rc.virtual_hosts[0].routes] == ["reviews~v2", "split", "reviews"]
