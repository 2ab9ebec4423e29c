"""A small xDS test client: send requests, read responses, ACK, NACK, and expect silence.

It speaks to xdsd the way Envoy does, but one message at a time, so a test reads as the
protocol conversation it checks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
STANDALONE = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "/envoy.service.cluster.v3.ClusterDiscoveryService/",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "/envoy.service.endpoint.v3.EndpointDiscoveryService/",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "/envoy.service.listener.v3.ListenerDiscoveryService/",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "/envoy.service.route.v3.RouteDiscoveryService/",
}
_SOTW_METHOD = {ADS: "StreamAggregatedResources"}
_DELTA_METHOD = {ADS: "DeltaAggregatedResources"}
for _svc in STANDALONE.values():
    _kind = _svc.split(".")[2]  # cluster/endpoint/listener/route
    _SOTW_METHOD[_svc] = {"cluster": "StreamClusters", "endpoint": "StreamEndpoints", "listener": "StreamListeners", "route": "StreamRoutes"}[_kind]
    _DELTA_METHOD[_svc] = {"cluster": "DeltaClusters", "endpoint": "DeltaEndpoints", "listener": "DeltaListeners", "route": "DeltaRoutes"}[_kind]


class XdsClient:
    """One stream. ``delta`` picks the incremental variant; ``service`` ADS or a standalone one."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str = "test-node",
        cluster: str = "edge",
        *,
        delta: bool = False,
        service: str = ADS,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.delta = delta
        self.node = base_pb2.Node(id=node_id, cluster=cluster)
        self._first = True
        method = service + (_DELTA_METHOD if delta else _SOTW_METHOD)[service]
        if delta:
            rpc = channel.stream_stream(
                method,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )
        else:
            rpc = channel.stream_stream(
                method,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
        self.call = rpc(metadata=tuple(metadata))
        self.received: list[object] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._reader: asyncio.Future[None] | None = None

    def _node(self) -> base_pb2.Node | None:
        if self._first:
            self._first = False
            return self.node
        return None

    # -- state of the world ---------------------------------------------------------------

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        node = self._node()
        if node is not None:
            req.node.CopyFrom(node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(req)

    async def ack(self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        await self.request(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)

    async def nack(
        self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] = (), *, accepted_version: str = "", error: str = "rejected by test"
    ) -> None:
        await self.request(resp.type_url, names, version=accepted_version, nonce=resp.nonce, error=error)

    # -- incremental ----------------------------------------------------------------------

    async def delta_request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        initial: Mapping[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=dict(initial or {}),
            response_nonce=nonce,
        )
        node = self._node()
        if node is not None:
            req.node.CopyFrom(node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(req)

    async def delta_ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.delta_request(resp.type_url, nonce=resp.nonce)

    async def delta_nack(self, resp: discovery_pb2.DeltaDiscoveryResponse, error: str = "rejected by test") -> None:
        await self.delta_request(resp.type_url, nonce=resp.nonce, error=error)

    # -- reading --------------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_all())

    async def _read_all(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    break
                await self._queue.put(resp)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            await self._queue.put(None)

    async def recv(self, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        """The next response; fails the test if none arrives within ``timeout``."""
        self._ensure_reader()
        try:
            resp = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no response within {timeout}s") from None
        if resp is None:
            await self._queue.put(None)
            raise AssertionError(f"stream ended: {self.error}")
        self.received.append(resp)
        return resp

    async def expect_none(self, timeout: float = 0.5) -> None:
        """Fails the test if any response arrives within ``timeout``."""
        self._ensure_reader()
        try:
            resp = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got: {resp}")

    async def expect_error(self, timeout: float = 5.0) -> grpc.aio.AioRpcError:
        """Waits for the stream to end with an error status and returns it."""
        self._ensure_reader()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                resp = await asyncio.wait_for(self._queue.get(), max(0.01, remaining))
            except TimeoutError:
                raise AssertionError("stream did not end with an error") from None
            if resp is None:
                assert self.error is not None, "stream ended without an error status"
                return self.error

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
