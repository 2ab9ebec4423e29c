"""Whatever a client sends on an ADS stream — any node, any ``xdsd.*`` metadata, any names, nonces
and versions — the stream is served or ends with a client-error status, never INTERNAL or UNKNOWN;
the next revision still applies and a well-behaved client is still served (fault isolation)."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.component.conftest import BASE_MESH, Harness, with_service
from tests.support.xds_client import XdsClient
from xdsd.model import load_mesh

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPES = [CLUSTER, "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
         "type.googleapis.com/envoy.config.listener.v3.Listener",
         "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
         "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "", "type.googleapis.com/x"]
KEYS = ["xdsd.admin_address", "xdsd.inbound_address", "xdsd.app_address", "xdsd.xds_cluster",
        "xdsd.authz_cluster", "xdsd.unknown", "team"]
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}

values = st.one_of(st.text(max_size=40), st.sampled_from(["127.0.0.1:9901", "evil", "[::1]:1", "10.0.0.1\n",
                                                          "127.0.0.1:0", "a|b", "::1%eth0", "xds_cluster"]),
                   st.floats(allow_nan=True), st.booleans())
requests = st.builds(
    dict,
    node_id=st.one_of(st.just("fuzz-node"), st.text(max_size=300)),
    cluster=st.sampled_from(["edge", "reviews", "", "nope", "x" * 300]),
    metadata=st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
    zone=st.text(max_size=20),
    type_url=st.sampled_from(TYPES),
    names=st.lists(st.text(max_size=30), max_size=8),
    nonce=st.sampled_from(["", "1", "999", "x"]),
    version=st.text(max_size=10),
    error=st.one_of(st.none(), st.text(max_size=50)),
)


def _request(spec: dict[str, object]) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=spec["type_url"], resource_names=spec["names"],  # type: ignore[arg-type]
                                         response_nonce=spec["nonce"], version_info=spec["version"])  # type: ignore[arg-type]
    req.node.id = spec["node_id"]  # type: ignore[assignment]
    req.node.cluster = spec["cluster"]  # type: ignore[assignment]
    req.node.locality.zone = spec["zone"]  # type: ignore[assignment]
    for key, value in spec["metadata"].items():  # type: ignore[attr-defined]
        v = struct_pb2.Value()
        if isinstance(value, bool):
            v.bool_value = value
        elif isinstance(value, float):
            v.number_value = value
        else:
            v.string_value = value
        req.node.metadata.fields[key].CopyFrom(v)
    if spec["error"] is not None:
        req.error_detail.message = spec["error"]  # type: ignore[assignment]
    return req


async def _stream(xds: Harness, first: discovery_pb2.DiscoveryRequest,
                  then: discovery_pb2.DiscoveryRequest | None = None) -> None:
    """One ADS stream: ``first``; if the server answers, ``then`` (writing only while the stream is
    open, so the status checked is the server's, not a client's failed write)."""
    call = xds.channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()
    try:
        await call.write(first)
        answered = await asyncio.wait_for(call.read(), 0.2)
        if then is not None and answered is not grpc.aio.EOF and not call.done():
            await call.write(then)
            await asyncio.wait_for(call.read(), 0.2)
    except (TimeoutError, grpc.aio.AioRpcError):
        pass
    if call.done():
        code = await call.code()
        assert code in ALLOWED | {grpc.StatusCode.OK}, (code, await call.details())
    call.cancel()


async def _send(xds: Harness, specs: list[dict[str, object]]) -> None:
    for spec in specs:
        await _stream(xds, _request(spec))  # any node, any first request
        # A well-formed start, then anything on the same stream (nonces, names, NACKs, type URLs).
        follow = _request(spec)
        follow.ClearField("node")
        good = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        good.node.id, good.node.cluster = "fuzz-good", "edge"
        await _stream(xds, good, follow)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests, min_size=1, max_size=2))
async def test_any_ads_request_is_served_or_refused_cleanly(xds: Harness, specs: list[dict[str, object]]) -> None:
    xds.set_mesh(BASE_MESH)
    await _send(xds, specs)
    # The next revision applies for everyone, and a well-behaved client is served it.
    xds.cache.update(load_mesh(with_service("extra")))
    good = XdsClient(xds.channel, "good-node", "edge")
    try:
        await good.request(CLUSTER)
        resp = await good.recv(timeout=10)
        assert any(r.value for r in resp.resources)
    finally:
        await good.close()
