"""State-of-the-world xDS, as xdsd speaks it: one test per rule of Envoy's protocol document.

Each test is a short conversation between a test client (playing Envoy) and the server.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from tests.component.conftest import BASE_MESH, Harness, with_service
from tests.support.xds_client import STANDALONE
from xdsd import typeurls
from xdsd.cache import SnapshotCache
from xdsd.generators import NodeGroup, generate
from xdsd.model import load_mesh

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE


def names(resp) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for any_ in resp.resources:
        if any_.type_url == CDS:
            m = cluster_pb2.Cluster()
            any_.Unpack(m)
            out.append(m.name)
        elif any_.type_url == EDS:
            e = endpoint_pb2.ClusterLoadAssignment()
            any_.Unpack(e)
            out.append(e.cluster_name)
        elif any_.type_url == LDS:
            listener = listener_pb2.Listener()
            any_.Unpack(listener)
            out.append(listener.name)
        elif any_.type_url == RDS:
            rc = route_pb2.RouteConfiguration()
            any_.Unpack(rc)
            out.append(rc.name)
        else:
            out.append(any_.type_url)
    return sorted(out)


def weights(resp, cluster: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    for any_ in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_.Unpack(cla)
        if cla.cluster_name == cluster:
            return {
                f"{lb.endpoint.address.socket_address.address}:{lb.endpoint.address.socket_address.port_value}": lb.load_balancing_weight.value
                for loc in cla.endpoints
                for lb in loc.lb_endpoints
            }
    raise AssertionError(f"{cluster} not in response")


async def test_nothing_is_served_before_a_valid_config_is_loaded(xds: Harness) -> None:
    c = xds.client()
    await c.request(CDS)
    await c.expect_none(0.5)  # a (re)started control plane never answers with an empty state
    xds.set_mesh(BASE_MESH)
    resp = await c.recv()
    assert names(resp) == ["ratings", "reviews"]


async def test_wildcard_cluster_request_gets_the_full_state(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)  # empty resource_names on the first request: legacy wildcard
    resp = await c.recv()
    assert resp.type_url == CDS
    assert names(resp) == ["ratings", "reviews"]
    assert resp.version_info and resp.nonce


async def test_explicit_wildcard_name(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS, ["*"])
    assert names(await c.recv()) == ["ratings", "reviews"]


async def test_ack_advances_the_acknowledged_version(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    resp = await c.recv()
    await c.ack(resp)
    await c.expect_none(0.3)  # an ACK is not answered when nothing changed
    cds = xds.node_status()["types"]["CDS"]
    assert cds["acked_version"] == resp.version_info
    assert cds["state"] == "SYNCED"


async def test_nack_is_recorded_and_the_version_is_not_resent(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    first = await c.recv()
    await c.ack(first)
    xds.set_mesh(with_service("extra"))
    second = await c.recv()
    await c.nack(second, accepted_version=first.version_info, error="cluster extra: bad config")
    await c.expect_none(0.5)  # the rejected version is not sent again
    cds = xds.node_status()["types"]["CDS"]
    assert cds["state"] == "NACKED"
    assert cds["last_nack"] == "cluster extra: bad config"
    assert cds["acked_version"] == first.version_info
    # Only a new snapshot brings a new response.
    xds.set_mesh(BASE_MESH)
    third = await c.recv()
    assert third.version_info == first.version_info and third.nonce != first.nonce
    await c.ack(third)
    await c.expect_none(0.3)
    assert xds.node_status()["types"]["CDS"]["state"] == "SYNCED"


async def test_a_request_with_a_stale_nonce_is_ignored(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(EDS, ["reviews"])
    first = await c.recv()
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 5"))
    second = await c.recv()
    assert second.nonce != first.nonce
    # A request that answers the older response is stale, whatever it asks for.
    await c.request(EDS, ["reviews", "ratings"], version=first.version_info, nonce=first.nonce)
    await c.expect_none(0.5)
    # The same subscription with the current nonce is honoured.
    await c.request(EDS, ["reviews", "ratings"], version=second.version_info, nonce=second.nonce)
    assert names(await c.recv()) == ["ratings"]


async def test_nothing_is_sent_when_nothing_changed(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    resp = await c.recv()
    await c.ack(resp)
    xds.set_mesh(BASE_MESH)  # identical content: same versions, nothing to say
    xds.set_mesh("# a comment changes nothing\n" + BASE_MESH)
    await c.expect_none(0.5)


async def test_versions_are_per_type_and_only_changed_types_are_pushed(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    cds = await c.recv()
    await c.ack(cds)
    await c.request(EDS, ["reviews", "ratings"])
    eds = await c.recv()
    await c.ack(eds, ["reviews", "ratings"])
    assert cds.version_info != eds.version_info
    # An endpoint weight change is an EDS change only; only the changed assignment is sent.
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 7"))
    update = await c.recv()
    assert update.type_url == EDS
    assert names(update) == ["reviews"]
    assert weights(update, "reviews")["10.0.0.1:8080"] == 7
    await c.ack(update, ["reviews", "ratings"])
    await c.expect_none(0.5)  # and no CDS push


async def test_legacy_empty_list_stops_meaning_wildcard_once_a_name_was_subscribed(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    resp = await c.recv()
    await c.ack(resp, ["reviews"])  # now named: only reviews
    narrowed = await c.recv()
    assert names(narrowed) == ["reviews"]
    await c.ack(narrowed, [])  # empty after a name: unsubscribe from everything
    await c.expect_none(0.3)
    xds.set_mesh(with_service("other"))
    await c.expect_none(0.5)


async def test_a_name_requested_before_it_exists_is_sent_when_it_appears(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(EDS, ["details"])
    await c.expect_none(0.5)
    xds.set_mesh(with_service("details", "10.0.2.1", routed=False))
    # "details" is a service, but no gateway routes to it yet, so the edge group does not have it.
    await c.expect_none(0.3)
    xds.set_mesh(with_service("details", "10.0.2.1"))
    resp = await c.recv()
    assert names(resp) == ["details"]
    assert weights(resp, "details") == {"10.0.2.1:9080": 1}


async def test_ads_pushes_in_order_cds_eds_lds_rds(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    await c.ack(await c.recv())
    await c.request(EDS, ["reviews", "ratings"])
    await c.ack(await c.recv(), ["reviews", "ratings"])
    await c.request(LDS)
    await c.ack(await c.recv())
    await c.request(RDS, ["edge"])
    await c.ack(await c.recv(), ["edge"])
    # One edit that changes every type: a new service routed from the gateway.
    xds.set_mesh(with_service("details").replace("port: 10000", "port: 10001"))
    cds = await c.recv()
    assert cds.type_url == CDS and "details" in names(cds)
    await c.ack(cds)
    # LDS and RDS wait until the endpoints of the new cluster are held (make-before-break).
    await c.expect_none(0.3)
    await c.request(EDS, ["reviews", "ratings", "details"], version=cds.version_info, nonce="")
    order = []
    for _ in range(3):
        resp = await c.recv()
        order.append(resp.type_url)
    assert order == [EDS, LDS, RDS]


async def test_versions_derive_from_content_so_replicas_agree(xds: Harness) -> None:
    mesh = load_mesh(BASE_MESH)
    a, b = SnapshotCache(generate), SnapshotCache(generate)
    a.update(mesh)
    b.update(load_mesh(BASE_MESH))
    group = NodeGroup("edge")
    sa, sb = a.snapshot(group), b.snapshot(group)
    assert sa is not None and sb is not None
    for t in (CDS, EDS, LDS, RDS):
        assert sa.get(t).version == sb.get(t).version
    # And a served response carries that version.
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(LDS)
    assert (await c.recv()).version_info == sa.get(LDS).version


@pytest.mark.parametrize(("type_url", "ask", "expected"), [
    (CDS, [], ["ratings", "reviews"]),
    (EDS, ["reviews", "ratings"], ["ratings", "reviews"]),
    (LDS, [], ["edge"]),
    (RDS, ["edge"], ["edge"]),
], ids=["CDS", "EDS", "LDS", "RDS"])
async def test_standalone_services_serve_their_type(xds: Harness, type_url: str, ask: list[str], expected: list[str]) -> None:
    """Each per-type service answers with its own type only, and exactly what the node should get."""
    xds.set_mesh(BASE_MESH)
    c = xds.client(service=STANDALONE[type_url])
    await c.request("", ask)  # type_url may be left out on a per-type service
    resp = await c.recv()
    assert resp.type_url == type_url
    assert {r.type_url for r in resp.resources} == {type_url}
    assert names(resp) == expected


async def test_first_request_without_a_node_is_refused(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(node_id="")
    await c.request(CDS)
    err = await c.expect_error()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cluster_responses_always_carry_the_full_state(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client()
    await c.request(CDS)
    await c.ack(await c.recv())
    xds.set_mesh(with_service("extra", routed=False))
    await c.expect_none(0.3)  # "extra" is not routed from the edge: not in its group
    xds.set_mesh(BASE_MESH.replace("/ratings, service: ratings", "/ratings, service: reviews"))
    resp = await asyncio.wait_for(c.recv(), 5)
    # The unchanged cluster is there again; ratings is gone by omission (SotW has no removal list).
    assert names(resp) == ["reviews"]


SIDECAR_MESH = """
services:
  productpage:
    sidecar: {inbound: {port: 15006}, app_port: 9080, upstreams: {reviews: 9081, ratings: 9082}}
  reviews:
    endpoints: [{address: 10.0.0.1, port: 8080}]
  ratings:
    endpoints: [{address: 10.0.1.1, port: 8080}]
"""


async def test_listener_responses_always_carry_the_full_state(xds: Harness) -> None:
    """A sidecar holds three listeners; one changes (ratings moves to another outbound port): the
    response carries all of them, the two unchanged ones included, and the old one by omission."""
    xds.set_mesh(SIDECAR_MESH)
    c = xds.client("productpage-1", "productpage")
    await c.request(LDS)
    first = await c.recv()
    before = set(names(first))
    assert {"outbound|9081|reviews", "outbound|9082|ratings"} <= before and len(before) == 3, before
    await c.ack(first)
    xds.set_mesh(SIDECAR_MESH.replace("ratings: 9082", "ratings: 9083"))
    resp = await asyncio.wait_for(c.recv(), 5)
    assert resp.type_url == LDS
    assert set(names(resp)) == (before - {"outbound|9082|ratings"}) | {"outbound|9083|ratings"}
