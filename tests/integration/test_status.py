"""Visibility into what each proxy accepted: `xdsd status`, `xdsd config-dump`, CSDS and the push
latency histograms, against a real xdsd with a real Envoy and a protocol-level test client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.integration.conftest import MeshFile
from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port, wait_for
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xds_client import XdsClient
from tests.support.xdsd_proc import XdsdProcess
from xdsd import typeurls


def xdsd_cli(xdsd: XdsdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsd", *args, "--admin-address", f"127.0.0.1:{xdsd.admin_port}"],
        capture_output=True, text=True, timeout=30,
    )


async def test_status_config_dump_and_csds(
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
) -> None:
    ups = start_upstreams({"v1": "127.0.0.2"})
    gw = free_port()
    host, port = ups.addresses["v1"]
    mesh_file.write(f"""
services:
  reviews: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {gw}}}, routes: [{{prefix: /, service: reviews}}]}}
""")
    xdsd = start_xdsd(mesh_file.path)
    start_envoy(xdsd, "edge-1", "edge")
    wait_for(lambda: send_requests(f"http://127.0.0.1:{gw}/", 1)[0].status == 200, "traffic", 30)

    # A real Envoy that ACKed everything is SYNCED on every type.
    def synced() -> bool:
        out = xdsd_cli(xdsd, "status").stdout
        line = next((row for row in out.splitlines() if row.startswith("edge-1")), "")
        return line.count("SYNCED") == 4

    wait_for(synced, "edge-1 SYNCED on CDS, EDS, LDS and RDS", 15)

    # A protocol-level client: one response left unacknowledged (STALE), one NACKed.
    channel = xdsd.channel()
    stale = XdsClient(channel, "stale-1", "edge", metadata=[("x-xdsd-token", xdsd.token("stale-1", "edge"))])
    await stale.request(typeurls.CLUSTER)
    await stale.recv()
    nacker = XdsClient(channel, "nacker-1", "edge", metadata=[("x-xdsd-token", xdsd.token("nacker-1", "edge"))])
    await nacker.request(typeurls.CLUSTER)
    resp = await nacker.recv()
    await nacker.nack(resp, error="cluster reviews: unsupported field")
    try:
        wait_for(lambda: "NACK: cluster reviews: unsupported field" in xdsd_cli(xdsd, "status").stdout, "the NACK in status", 15)
        out = xdsd_cli(xdsd, "status").stdout
        assert next(r for r in out.splitlines() if r.startswith("stale-1")).split()[3] == "STALE"
        assert next(r for r in out.splitlines() if r.startswith("nacker-1")).split()[3] == "NACKED"
        detail = xdsd_cli(xdsd, "status", "--node", "nacker-1").stdout
        assert "CDS: NACKED" in detail and "unsupported field" in detail

        # config-dump: what xdsd serves edge-1, no private keys.
        dump = json.loads(xdsd_cli(xdsd, "config-dump", "--node", "edge-1").stdout)
        assert [c["name"] for c in dump["resources"]["CDS"]] == ["reviews"]
        assert dump["resources"]["EDS"][0]["resource"]["cluster_name"] == "reviews"
        assert xdsd_cli(xdsd, "config-dump", "--node", "nobody").returncode == 1

        # CSDS: a ClientConfig per connected node, with the versions xdsd serves.
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        operator = (("x-xdsd-token", xdsd.operator_token()),)
        status = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), metadata=operator)
        by_node = {c.node.id: c for c in status.config}
        assert set(by_node) == {"edge-1", "stale-1", "nacker-1"}
        edge = {(g.type_url, g.name): g for g in by_node["edge-1"].generic_xds_configs}
        cds = edge[(typeurls.CLUSTER, "reviews")]
        assert cds.version_info == dump["resources"]["CDS"][0]["version"]
        assert cds.config_status == csds_pb2.SYNCED
        nacked = next(iter(by_node["nacker-1"].generic_xds_configs))
        assert nacked.config_status == csds_pb2.ERROR and "unsupported field" in nacked.error_state.details
        one = csds_pb2.ClientStatusRequest()
        one.node_matchers.add().node_id.exact = "edge-1"
        assert [c.node.id for c in (await stub.FetchClientStatus(one, metadata=operator)).config] == ["edge-1"]
    finally:
        await stale.close()
        await nacker.close()
        await channel.close()

    # Push latency histograms are populated (change -> sent, sent -> ACK).
    assert xdsd.metric_value("xdsd_push_latency_seconds_count", {"type": "EDS"}) >= 1
    assert xdsd.metric_value("xdsd_ack_latency_seconds_count", {"type": "EDS"}) >= 1
