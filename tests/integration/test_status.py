"""Visibility into what each proxy accepted: `xdsd status` (text and --json), `xdsd config-dump`,
CSDS and the push/ACK/NACK metrics, against a real xdsd with a real Envoy and a protocol-level test
client."""

from __future__ import annotations

import json
from collections.abc import Callable

from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import MeshFile, edge_mesh
from tests.support.procs import free_port, wait_for
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xds_client import XdsClient
from tests.support.xdsd_proc import XdsdProcess
from xdsd import typeurls

TYPES = ("CDS", "EDS", "LDS", "RDS")


def _status_line(proc: XdsdProcess, node: str) -> list[str]:
    out = proc.cli("status").stdout
    return next((row.split() for row in out.splitlines() if row.startswith(node)), [])


async def test_status_config_dump_csds_and_metrics(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
) -> None:
    ups = upstreams({"v1": "127.0.0.2"})
    gw = free_port()
    mesh_file.write(edge_mesh(gw, [ups.address("v1")]))
    server = xdsd()
    envoy_factory(server, "edge-1", "edge")
    wait_for(lambda: send_requests(f"http://127.0.0.1:{gw}/", 1)[0].status == 200, "traffic", 30)

    # A real Envoy that ACKed everything is SYNCED on every type.
    wait_for(lambda: _status_line(server, "edge-1").count("SYNCED") == 4, "edge-1 SYNCED on CDS, EDS, LDS and RDS", 15)
    pushes = {t: server.metric_value("xdsd_pushes_total", {"type": t}) for t in TYPES}
    acks = {t: server.metric_value("xdsd_acks_total", {"type": t}) for t in TYPES}
    assert all(pushes[t] >= 1 and acks[t] >= 1 for t in TYPES), (pushes, acks)
    assert server.metric_value("xdsd_nacks_total", {"type": "CDS"}) == 0
    assert server.metric_value("xdsd_ready") == 1
    assert server.metric_value("xdsd_event_loop_stall_seconds_count") >= 1  # the loop monitor's timer ran

    # A protocol-level client: one response left unacknowledged (STALE), one NACKed.
    channel = server.channel()
    stale = XdsClient(channel, "stale-1", "edge", metadata=[("x-xdsd-token", server.token("stale-1", "edge"))])
    await stale.request(typeurls.CLUSTER)
    await stale.recv()
    nacker = XdsClient(channel, "nacker-1", "edge", metadata=[("x-xdsd-token", server.token("nacker-1", "edge"))])
    await nacker.request(typeurls.CLUSTER)
    resp = await nacker.recv()
    await nacker.nack(resp, error="cluster reviews: unsupported field")
    try:
        wait_for(lambda: "NACK: cluster reviews: unsupported field" in server.cli("status").stdout, "the NACK in status", 15)
        assert _status_line(server, "stale-1")[3] == "STALE"
        assert _status_line(server, "nacker-1")[3] == "NACKED"
        detail = server.cli("status", "--node", "nacker-1").stdout
        assert "CDS: NACKED" in detail and "unsupported field" in detail
        # One NACK, counted once; both clients were pushed their clusters; the stale one ACKed nothing.
        assert server.metric_value("xdsd_nacks_total", {"type": "CDS"}) == 1
        assert server.metric_value("xdsd_pushes_total", {"type": "CDS"}) >= pushes["CDS"] + 2
        assert server.metric_value("xdsd_acks_total", {"type": "CDS"}) == acks["CDS"]

        # status --json: the same per-proxy state, for scripts.
        as_json = server.cli("status", "--json")
        assert as_json.returncode == 0, as_json.stderr
        nodes = {n["node_id"]: n for n in json.loads(as_json.stdout)}
        assert set(nodes) == {"edge-1", "stale-1", "nacker-1"}
        assert nodes["edge-1"]["cluster"] == "edge"
        assert {t: nodes["edge-1"]["types"][t]["state"] for t in TYPES} == dict.fromkeys(TYPES, "SYNCED")
        assert nodes["stale-1"]["types"]["CDS"]["state"] == "STALE"
        nacked = nodes["nacker-1"]["types"]["CDS"]
        assert nacked["state"] == "NACKED" and nacked["last_nack"] == "cluster reviews: unsupported field"

        # config-dump: what xdsd serves edge-1.
        dump = json.loads(server.cli("config-dump", "--node", "edge-1").stdout)
        assert [c["name"] for c in dump["resources"]["CDS"]] == ["reviews"]
        assert dump["resources"]["EDS"][0]["resource"]["cluster_name"] == "reviews"
        assert server.cli("config-dump", "--node", "nobody").returncode == 1

        # CSDS: a ClientConfig per connected node, with the versions xdsd serves.
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        operator = (("x-xdsd-token", server.operator_token()),)
        status = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), metadata=operator)
        by_node = {c.node.id: c for c in status.config}
        assert set(by_node) == {"edge-1", "stale-1", "nacker-1"}
        edge = {(g.type_url, g.name): g for g in by_node["edge-1"].generic_xds_configs}
        cds = edge[(typeurls.CLUSTER, "reviews")]
        assert cds.version_info == dump["resources"]["CDS"][0]["version"]
        assert cds.config_status == csds_pb2.SYNCED
        nacked_config = next(iter(by_node["nacker-1"].generic_xds_configs))
        assert nacked_config.config_status == csds_pb2.ERROR and "unsupported field" in nacked_config.error_state.details
        one = csds_pb2.ClientStatusRequest()
        one.node_matchers.add().node_id.exact = "edge-1"
        assert [c.node.id for c in (await stub.FetchClientStatus(one, metadata=operator)).config] == ["edge-1"]
    finally:
        await stale.close()
        await nacker.close()
        await channel.close()

    # Push latency histograms are populated (change -> sent, sent -> ACK).
    assert server.metric_value("xdsd_push_latency_seconds_count", {"type": "EDS"}) >= 1
    assert server.metric_value("xdsd_ack_latency_seconds_count", {"type": "EDS"}) >= 1
