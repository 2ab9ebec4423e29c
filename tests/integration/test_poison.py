"""Issue 16, finding 2, against a real `xdsd serve` with a real sidecar: one node token's poison (bad
node metadata, a first request with a nonce never sent), a 3,000-deep mesh file and a reserved
service name cannot stop the control plane: a valid edit is still applied, certificates still rotate,
`/readyz` stays honest and no background task is failing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS, MeshFile
from tests.support.procs import free_port
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def mesh(ups: Upstreams, inbound: int, extra: str = "") -> str:
    return f"""
mesh: {{cert_lifetime: 6s}}
telemetry:
  stats: {{port: {free_port("127.0.0.3")}}}
services:
  reviews:
    sidecar: {{inbound: {{address: 127.0.0.3, port: {inbound}}}, app_address: 127.0.0.3, app_port: {ups.addresses["reviews"][1]}}}
{extra}"""


async def _poison(proc: XdsdProcess) -> list[grpc.StatusCode]:
    """The finding's requests, with a valid token for the node they claim to be."""
    codes = []
    async with proc.channel() as channel:
        method = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        for node_id, metadata, nonce in (("evil-1", {"xdsd.admin_address": "evil"}, ""),
                                         ("evil-2", {}, "999"),  # a nonce never sent, on the first request
                                         ("evil-3", {"xdsd.admin_address": "127.0.0.1:0"}, "7")):
            req = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce=nonce)
            req.node.id, req.node.cluster = node_id, "reviews"
            for key, value in metadata.items():
                req.node.metadata.fields[key].CopyFrom(struct_pb2.Value(string_value=value))

            async def one(r: discovery_pb2.DiscoveryRequest = req) -> object:
                yield r
                await asyncio.sleep(1.0)

            call = method(one(), metadata=(("x-xdsd-token", proc.token(node_id, "reviews")),))
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError:
                pass
            codes.append(await call.code())
    return codes


def _secret_versions(envoy: object) -> set[str]:
    dump = envoy.config_dump("dynamic_active_secrets")  # type: ignore[attr-defined]
    return {s["version_info"] for s in dump.get("configs", []) if s.get("name", "").endswith("/reviews")}


def test_poison_does_not_stop_the_control_plane(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
                                                envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"reviews": "127.0.0.3"})
    inbound = free_port("127.0.0.3")
    mesh_file.write(mesh(ups, inbound))
    proc = xdsd()
    envoy = envoy_factory(proc, "reviews-1", "reviews", mode=ADS, inbound_address="127.0.0.3")
    proc.wait_for(lambda: _secret_versions(envoy), "the sidecar's SVID", 30)
    first_secret = _secret_versions(envoy)

    codes = asyncio.run(_poison(proc))
    assert codes[0] == grpc.StatusCode.INVALID_ARGUMENT  # bad metadata: refused, naming the key
    assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED) for code in codes), codes
    refused = str(proc.admin_get_json("/debug/refused")) + proc.log_tail(200)
    assert "node.metadata.xdsd.admin_address" in refused

    # A file nested 3,000 deep and a reserved service name are rejected; the watcher lives on.
    revision = proc.admin_get_json("/debug/config")["revision"]
    mesh_file.write("services:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(3000)))
    proc.wait_for(lambda: "nested deeper" in str(proc.admin_get_json("/debug/config")["last_error"]), "the deep file refused", 20)
    mesh_file.write(mesh(ups, inbound, "  xdsd-admin: {endpoints: [{address: 10.0.0.1, port: 80}]}\n"))
    proc.wait_for(lambda: "reserved" in str(proc.admin_get_json("/debug/config")["last_error"]), "the reserved name refused", 20)

    # A valid edit is still applied and pushed...
    mesh_file.write(mesh(ups, inbound, "  ratings: {endpoints: [{address: 10.0.0.9, port: 80}]}\n"))
    proc.wait_for(lambda: proc.admin_get_json("/debug/config")["revision"] > revision
                  and proc.admin_get_json("/debug/config")["valid"], "the valid edit applied", 20)
    # ...certificates still rotate (6 s lifetime: reissued at half-life) and reach the sidecar...
    proc.wait_for(lambda: _secret_versions(envoy) - first_secret, "a rotated SVID at the sidecar", 30)
    # ...and nothing is failing.
    assert proc.http_status("/readyz") == 200
    health = proc.admin_get_json("/debug/health")
    assert health["failing"] == [] and all(t["failures"] == 0 for t in health["tasks"]), health
