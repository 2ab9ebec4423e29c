"""Resources are wrapped into response entries by concatenation: the bytes must be what protobuf
itself would encode for the same DiscoveryResponse / DeltaDiscoveryResponse entry."""

from __future__ import annotations

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xdsd.cache.resources import Resource


@pytest.mark.parametrize("endpoints", [0, 1, 30, 3000])
@pytest.mark.parametrize("name", ["a", "reviews~v2", "n" * 300])
def test_entries_equal_protobufs_encoding(endpoints: int, name: str) -> None:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = cla.endpoints.add()
    for i in range(endpoints):
        locality.lb_endpoints.add().endpoint.address.socket_address.address = f"10.0.{i // 250}.{i % 250}"
    r = Resource.from_message(name, cla)
    sotw = discovery_pb2.DiscoveryResponse()
    sotw.resources.add().Pack(cla)
    assert r.sotw_field == sotw.SerializeToString(deterministic=True)
    delta = discovery_pb2.DeltaDiscoveryResponse()
    entry = delta.resources.add(name=name, version=r.version)
    entry.resource.Pack(cla)
    assert discovery_pb2.DeltaDiscoveryResponse.FromString(r.delta_field) == delta
