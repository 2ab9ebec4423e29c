"""A node's identity and ``xdsd.*`` metadata are checked to the key before anything is built."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from xdsd.node import FetchMode, NodeError, NodeGroup


def node(**meta: object) -> base_pb2.Node:
    n = base_pb2.Node(id="n-1", cluster="reviews")
    for key, value in meta.items():
        n.metadata.fields[key.replace("_", ".", 1)].CopyFrom(struct_pb2.Value(**value))  # type: ignore[arg-type]
    return n


def test_a_bootstrap_node_is_read_as_its_group() -> None:
    n = node(xdsd_inbound_address={"string_value": "10.0.0.7"}, xdsd_admin_address={"string_value": "127.0.0.1:9901"},
             xdsd_authz_cluster={"string_value": "xdsd_authz"})
    n.locality.zone = "zone-a"
    group = NodeGroup.from_node(n, FetchMode.ADS)
    assert (group.cluster, group.inbound_address, group.admin_address, group.authz_cluster, group.zone) == (
        "reviews", "10.0.0.7", "127.0.0.1:9901", "xdsd_authz", "zone-a")
    assert group.xds_cluster == "xds_cluster"
    v6 = NodeGroup.from_node(node(xdsd_admin_address={"string_value": "[::1]:9901"}), FetchMode.ADS)
    assert v6.admin_address == "[::1]:9901"


@pytest.mark.parametrize(("meta", "field"), [
    ({"xdsd_admin_address": {"string_value": "evil"}}, "node.metadata.xdsd.admin_address"),
    ({"xdsd_admin_address": {"string_value": "127.0.0.1:0"}}, "node.metadata.xdsd.admin_address"),
    ({"xdsd_admin_address": {"string_value": "127.0.0.1:99999"}}, "node.metadata.xdsd.admin_address"),
    ({"xdsd_admin_address": {"string_value": "host.example:9901"}}, "node.metadata.xdsd.admin_address"),
    ({"xdsd_inbound_address": {"string_value": "127.0.0.1\n"}}, "node.metadata.xdsd.inbound_address"),
    ({"xdsd_app_address": {"string_value": "not-an-ip"}}, "node.metadata.xdsd.app_address"),
    ({"xdsd_xds_cluster": {"string_value": "a|b"}}, "node.metadata.xdsd.xds_cluster"),
    ({"xdsd_authz_cluster": {"string_value": "x" * 200}}, "node.metadata.xdsd.authz_cluster"),
    ({"xdsd_inbound_address": {"number_value": 1}}, "node.metadata.xdsd.inbound_address"),
    ({"xdsd_bogus": {"string_value": "x"}}, "node.metadata.xdsd.bogus"),
])
def test_bad_metadata_is_refused_naming_the_key(meta: dict[str, object], field: str) -> None:
    with pytest.raises(NodeError, match=field.replace(".", r"\.")):
        NodeGroup.from_node(node(**meta), FetchMode.ADS)


def test_bad_identity_is_refused() -> None:
    for n, field in ((base_pb2.Node(id="", cluster="c"), "node.id"), (base_pb2.Node(id="x" * 300, cluster="c"), "node.id"),
                     (base_pb2.Node(id="a\x1b[2J", cluster="c"), "node.id"), (base_pb2.Node(id="a", cluster="c\n"), "node.cluster")):
        with pytest.raises(NodeError, match=field):
            NodeGroup.from_node(n, FetchMode.ADS)


def test_the_node_own_metadata_is_not_read() -> None:
    assert NodeGroup.from_node(node(team={"string_value": "x"}, version={"number_value": 3}), FetchMode.ADS).cluster == "reviews"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["xdsd.admin_address", "xdsd.inbound_address", "xdsd.app_address",
                                        "xdsd.xds_cluster", "xdsd.authz_cluster", "xdsd.other", "mine"]),
                       st.one_of(st.text(max_size=300), st.floats(allow_nan=True), st.booleans()), max_size=5),
       st.text(max_size=300), st.text(max_size=300))
def test_any_node_is_a_group_or_a_node_error(meta: dict[str, object], node_id: str, zone: str) -> None:
    n = base_pb2.Node(id=node_id, cluster="reviews")
    n.locality.zone = zone
    for key, value in meta.items():
        v = struct_pb2.Value()
        if isinstance(value, bool):
            v.bool_value = value
        elif isinstance(value, float):
            v.number_value = value
        else:
            v.string_value = value  # type: ignore[assignment]
        n.metadata.fields[key].CopyFrom(v)
    try:
        group = NodeGroup.from_node(n, FetchMode.ADS)
    except NodeError:
        return
    hash(group)
    if group.admin_address is not None:  # what the telemetry generator parses
        host, _, port = group.admin_address.rpartition(":")
        assert 1 <= int(port) <= 65535 and host
