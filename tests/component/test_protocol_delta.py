"""Incremental (delta) xDS, as xdsd speaks it: one test per rule of Envoy's protocol document,
section "Incremental xDS". Each test is a short conversation between a test client and the server.

The differences from state of the world, in brief: every resource carries its own version; the
client says what it subscribes to and unsubscribes from (not its whole list each time); the server
sends only what changed and names deletions in ``removed_resources``; nonces only pair ACK/NACK
with responses.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2

from tests.component.conftest import BASE_MESH, Harness, with_service
from xdsd import typeurls

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE


def names(resp) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(r.name for r in resp.resources)


def versions(resp) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r.name: r.version for r in resp.resources}


async def test_wildcard_subscription_gets_every_resource_with_its_own_version(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS)  # no names on the first request: wildcard
    resp = await c.recv()
    assert names(resp) == ["ratings", "reviews"]
    assert all(r.version for r in resp.resources)
    assert not resp.removed_resources
    cluster = cluster_pb2.Cluster()
    resp.resources[0].resource.Unpack(cluster)
    assert cluster.name == resp.resources[0].name


async def test_ack_advances_the_acknowledged_version_and_gets_no_answer(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS, ["*"])
    resp = await c.recv()
    await c.delta_ack(resp)
    await c.expect_none(0.3)
    cds = xds.node_status()["types"]["CDS"]
    assert cds["acked_nonce"] == resp.nonce and cds["state"] == "SYNCED"


async def test_only_the_changed_resource_is_sent(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews", "ratings"])
    first = await c.recv()
    await c.delta_ack(first)
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 9"))
    update = await c.recv()
    assert names(update) == ["reviews"]
    assert versions(update)["reviews"] != versions(first)["reviews"]
    assert not update.removed_resources


async def test_deleted_resources_are_named_in_removed_resources(xds: Harness) -> None:
    xds.set_mesh(with_service("details"))
    c = xds.client(delta=True)
    await c.delta_request(CDS)
    await c.delta_ack(await c.recv())
    xds.set_mesh(BASE_MESH)
    resp = await c.recv()
    assert list(resp.removed_resources) == ["details"]
    assert not resp.resources


async def test_subscribing_to_a_name_that_does_not_exist_answers_with_its_removal(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews", "nonexistent"])
    resp = await c.recv()
    assert names(resp) == ["reviews"]
    assert list(resp.removed_resources) == ["nonexistent"]


async def test_a_name_subscribed_before_it_exists_is_sent_when_it_appears(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["details"])
    first = await c.recv()
    assert list(first.removed_resources) == ["details"]
    await c.delta_ack(first)
    xds.set_mesh(with_service("details"))
    resp = await c.recv()
    assert names(resp) == ["details"]


async def test_reconnect_with_initial_resource_versions_sends_only_what_differs(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews", "ratings"])
    held = versions(await c.recv())
    await c.close()
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 2"))
    again = xds.client(delta=True)
    await again.delta_request(EDS, ["reviews", "ratings"], initial=held)
    resp = await again.recv()
    assert names(resp) == ["reviews"]  # ratings is unchanged: not resent


async def test_reconnect_names_resources_the_client_holds_that_are_gone(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS)
    resp = await c.recv()
    held = versions(resp)
    held["details"] = "0123456789abcdef"  # held from an earlier life; no longer exists
    again = xds.client("node-2", delta=True)
    await again.delta_request(CDS, initial=held)
    resp = await again.recv()
    assert not resp.resources
    assert list(resp.removed_resources) == ["details"]


async def test_resubscribing_to_a_held_name_resends_it(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews"])
    first = await c.recv()
    await c.delta_ack(first)
    await c.delta_request(EDS, ["reviews"], nonce=first.nonce)
    resp = await c.recv()
    assert names(resp) == ["reviews"]


async def test_unsubscribe_stops_updates_for_that_name(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews", "ratings"])
    first = await c.recv()
    assert names(first) == ["ratings", "reviews"]
    await c.delta_request(EDS, unsubscribe=["reviews"], nonce=first.nonce)
    await c.expect_none(0.3)
    # Both assignments change: only the one still subscribed is sent (the stream is alive and
    # updating; reviews is not in it).
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 4").replace("10.0.1.1", "10.0.1.2"))
    update = await c.recv()
    assert names(update) == ["ratings"] and not update.removed_resources
    await c.delta_ack(update)
    # A change to reviews alone sends nothing.
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 5").replace("10.0.1.1", "10.0.1.2"))
    await c.expect_none(0.5)


async def test_unsubscribing_a_name_while_wildcard_answers_with_the_resource(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS, ["*", "reviews"])
    first = await c.recv()
    await c.delta_ack(first)
    await c.delta_request(CDS, unsubscribe=["reviews"], nonce=first.nonce)
    resp = await c.recv()
    assert names(resp) == ["reviews"]  # still covered by the wildcard


async def test_subscription_changes_are_honoured_even_with_a_stale_nonce(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews"])
    first = await c.recv()
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 5"))
    second = await c.recv()
    assert second.nonce != first.nonce
    await c.delta_request(EDS, ["ratings"], nonce=first.nonce)  # stale nonce, new subscription
    resp = await c.recv()
    assert names(resp) == ["ratings"]


async def test_a_nacked_resource_version_is_not_resent_until_it_changes(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(EDS, ["reviews", "ratings"])
    await c.delta_ack(await c.recv())
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 6"))
    bad = await c.recv()
    await c.delta_nack(bad, "endpoint rejected")
    await c.expect_none(0.5)
    status = xds.node_status()["types"]["EDS"]
    assert status["state"] == "NACKED" and status["last_nack"] == "endpoint rejected"
    # A change to another resource sends that one only; the NACKed one stays unsent.
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 6").replace("10.0.1.1", "10.0.1.2"))
    resp = await c.recv()
    assert names(resp) == ["ratings"]
    # When the NACKed resource itself changes, it is sent again.
    xds.set_mesh(BASE_MESH.replace("weight: 3", "weight: 8").replace("10.0.1.1", "10.0.1.2"))
    assert names(await c.recv()) == ["reviews"]


async def test_nothing_is_sent_when_nothing_changed(xds: Harness) -> None:
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS)
    await c.delta_ack(await c.recv())
    xds.set_mesh("# same mesh\n" + BASE_MESH)
    await c.expect_none(0.5)


async def test_make_before_break_new_cluster_first_old_cluster_removed_last(xds: Harness) -> None:
    """A route moves from ratings to a new cluster, and ratings goes away: the new cluster and its
    endpoints reach the client before the route; the old cluster is removed after it."""
    xds.set_mesh(BASE_MESH)
    c = xds.client(delta=True)
    await c.delta_request(CDS)
    await c.delta_ack(await c.recv())
    await c.delta_request(EDS, ["reviews", "ratings"])
    await c.delta_ack(await c.recv())
    await c.delta_request(LDS)
    await c.delta_ack(await c.recv())
    await c.delta_request(RDS, ["edge"])
    await c.delta_ack(await c.recv())

    moved = BASE_MESH.replace("/ratings, service: ratings", "/ratings, service: ratings-v2").replace(
        "  ratings:\n", "  ratings-v2:\n"
    )
    xds.set_mesh(moved)
    cds = await c.recv()
    assert cds.type_url == CDS
    assert names(cds) == ["ratings-v2"] and not cds.removed_resources  # added, nothing removed yet
    await c.delta_ack(cds)
    await c.expect_none(0.3)  # routes wait for the endpoints of ratings-v2
    await c.delta_request(EDS, ["ratings-v2"], ["ratings"])
    eds = await c.recv()
    assert eds.type_url == EDS and names(eds) == ["ratings-v2"]
    rds = await c.recv()
    assert rds.type_url == RDS
    removal = await c.recv()
    assert removal.type_url == CDS and list(removal.removed_resources) == ["ratings"]


async def test_one_endpoint_change_among_200_services_sends_exactly_one_assignment(xds: Harness) -> None:
    def mesh(port_of_svc7: int) -> str:
        lines = ["gateways:", "  edge:", "    listen: {address: 127.0.0.1, port: 10000}", "    routes:"]
        lines += [f"      - {{prefix: /s{i}, service: s{i}}}" for i in range(200)]
        lines.append("services:")
        for i in range(200):
            port = port_of_svc7 if i == 7 else 8080
            lines.append(f"  s{i}:\n    endpoints: [{{address: 10.1.{i}.1, port: {port}}}, {{address: 10.1.{i}.2, port: 8080}}]")
        return "\n".join(lines) + "\n"

    xds.set_mesh(mesh(8080))
    c = xds.client(delta=True)
    all_names = [f"s{i}" for i in range(200)]
    await c.delta_request(CDS)
    await c.delta_ack(await c.recv())
    await c.delta_request(EDS, all_names)
    eds = await c.recv()
    assert len(eds.resources) == 200
    await c.delta_ack(eds)
    await c.delta_request(LDS)
    await c.delta_ack(await c.recv())
    await c.delta_request(RDS, ["edge"])
    await c.delta_ack(await c.recv())
    await c.expect_none(0.3)

    xds.set_mesh(mesh(8081))
    update = await c.recv()
    assert update.type_url == EDS
    assert names(update) == ["s7"] and not update.removed_resources
    await c.delta_ack(update)
    await c.expect_none(0.5)  # nothing for CDS, LDS or RDS
