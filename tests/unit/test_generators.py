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
