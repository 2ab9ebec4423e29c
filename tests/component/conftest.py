"""An in-process xDS server (cache + protocol server on a free port) and test clients for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.support.xds_client import ADS, XdsClient
from xdsd.cache import SnapshotCache
from xdsd.generators import generate
from xdsd.model import load_mesh
from xdsd.server.xds import XdsServer
from xdsd.transport import GrpcServer

BASE_MESH = """
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {prefix: /reviews, service: reviews}
      - {prefix: /ratings, service: ratings}
services:
  reviews:
    endpoints:
      - {address: 10.0.0.1, port: 8080, weight: 3}
      - {address: 10.0.0.2, port: 8080, weight: 1}
  ratings:
    endpoints:
      - {address: 10.0.1.1, port: 8080}
"""


def with_service(name: str, address: str = "10.0.9.1", port: int = 9080, *, routed: bool = True, base: str = BASE_MESH) -> str:
    """BASE_MESH plus one more service (routed from the edge gateway at /<name> unless routed=False)."""
    text = base + f"  {name}:\n    endpoints: [{{address: {address}, port: {port}}}]\n"
    if routed:
        anchor = "      - {prefix: /ratings, service: ratings}\n"
        text = text.replace(anchor, anchor + f"      - {{prefix: /{name}, service: {name}}}\n", 1)
    return text


class Harness:
    def __init__(self, cache: SnapshotCache, server: XdsServer, channel: grpc.aio.Channel) -> None:
        self.cache = cache
        self.server = server
        self.channel = channel
        self.clients: list[XdsClient] = []

    def set_mesh(self, text: str) -> None:
        self.cache.update(load_mesh(text))

    def client(self, node_id: str = "test-node", cluster: str = "edge", *, delta: bool = False, service: str = ADS) -> XdsClient:
        c = XdsClient(self.channel, node_id, cluster, delta=delta, service=service)
        self.clients.append(c)
        return c

    def node_status(self, node_id: str = "test-node") -> dict:  # type: ignore[type-arg]
        for entry in self.server.status():
            if entry["node_id"] == node_id:
                return entry
        raise AssertionError(f"node {node_id!r} not connected")


@pytest.fixture(params=["h2", "grpcio"])
async def xds(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The protocol server on both transports ``xdsd serve --xds-transport`` offers."""
    cache = SnapshotCache(generate)
    server = XdsServer(cache)
    grpc_server: grpc.aio.Server | GrpcServer
    if request.param == "h2":
        grpc_server = GrpcServer()
        grpc_server.add_generic_rpc_handlers(server.handlers())
        port = await grpc_server.listen("127.0.0.1", 0)
    else:
        grpc_server = grpc.aio.server()
        grpc_server.add_generic_rpc_handlers(server.handlers())
        port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    harness = Harness(cache, server, channel)
    try:
        yield harness
    finally:
        for c in harness.clients:
            await c.close()
        await channel.close()
        await grpc_server.stop(grace=None)
