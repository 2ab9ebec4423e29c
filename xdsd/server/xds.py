"""The xDS gRPC services: ADS and the standalone CDS/EDS/LDS/RDS services, state of the world and
delta. Responses leave as pre-assembled bytes (identity serializer): see ``encode``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xdsd import typeurls
from xdsd.cache import SnapshotCache
from xdsd.server.observer import NullObserver, StreamObserver
from xdsd.server.stream import Authenticator, ProtocolError, Refused, Stream, WakeQueue

log = logging.getLogger(__name__)

# (gRPC service, SotW method, delta method, fixed type URL or None for ADS)
SERVICES: tuple[tuple[str, str, str, str | None], ...] = (
    ("envoy.service.discovery.v3.AggregatedDiscoveryService", "StreamAggregatedResources", "DeltaAggregatedResources", None),
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "StreamClusters", "DeltaClusters", typeurls.CLUSTER),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "StreamEndpoints", "DeltaEndpoints", typeurls.ENDPOINT),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "StreamListeners", "DeltaListeners", typeurls.LISTENER),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes", typeurls.ROUTE),
    ("envoy.service.secret.v3.SecretDiscoveryService", "StreamSecrets", "DeltaSecrets", typeurls.SECRET),
)


def _identity(payload: bytes) -> bytes:
    return payload


class XdsServer:
    """Runs the protocol for every stream; holds the registry of open streams for status pages."""

    def __init__(
        self, cache: SnapshotCache, observer: StreamObserver | None = None, authenticator: Authenticator | None = None
    ) -> None:
        self.cache = cache
        self.authenticator = authenticator
        self.refusals: deque[dict[str, object]] = deque(maxlen=100)
        self.observer: StreamObserver = observer or NullObserver()
        self.streams: dict[int, Stream] = {}
        self.nodes: dict[str, set[Stream]] = {}  # node id -> its open streams
        self._registered: set[int] = set()
        self._wakes = WakeQueue()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        out: list[grpc.GenericRpcHandler] = []
        for service, sotw_method, delta_method, fixed in SERVICES:
            out.append(
                grpc.method_handlers_generic_handler(
                    service,
                    {
                        sotw_method: grpc.stream_stream_rpc_method_handler(
                            self._sotw_handler(fixed),
                            request_deserializer=_identity,  # parsed by Stream.on_sotw_data
                            response_serializer=_identity,
                        ),
                        delta_method: grpc.stream_stream_rpc_method_handler(
                            self._delta_handler(fixed),
                            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                            response_serializer=_identity,
                        ),
                    },
                )
            )
        return out

    def _sotw_handler(self, fixed: str | None) -> Callable[..., AsyncIterator[bytes]]:
        async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            stream = self._stream(context, fixed, False)
            async for payload in self._run(stream, requests, context, stream.on_sotw_data):
                yield payload

        return handler

    def _delta_handler(self, fixed: str | None) -> Callable[..., AsyncIterator[bytes]]:
        async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            stream = self._stream(context, fixed, True)
            async for payload in self._run(stream, requests, context, stream.on_delta_request):
                yield payload

        return handler

    def _stream(self, context: grpc.aio.ServicerContext, fixed: str | None, delta: bool) -> Stream:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return Stream(
            self.cache,
            self.observer,
            delta=delta,
            fixed_type=fixed,
            peer=context.peer(),
            metadata=metadata,
            authenticator=self.authenticator,
            wakes=self._wakes,
        )

    async def _run(
        self,
        stream: Stream,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        on_request: Callable[[Any], None],
    ) -> AsyncIterator[bytes]:
        error: list[BaseException] = []

        async def read() -> None:
            try:
                async for req in requests:
                    on_request(req)
            except (ProtocolError, Refused) as exc:
                error.append(exc)
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            finally:
                stream.ended = True
                stream.wake.set()

        self.streams[stream.id] = stream
        node_streams = self.nodes.get  # bound lookup: siblings are resolved at use time
        stream.siblings = lambda: node_streams(stream.node_id, ())  # type: ignore[method-assign]
        reader = asyncio.create_task(read())
        retry: asyncio.TimerHandle | None = None
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if error:
                    exc = error[0]
                    if isinstance(exc, Refused):
                        self._refused(stream, str(exc))
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"xdsd: {exc}")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if stream.ended:
                    return
                if stream.node is not None and stream.id not in self._registered:
                    self._registered.add(stream.id)
                    self.nodes.setdefault(stream.node_id, set()).add(stream)
                sent = False
                for out in stream.responses():
                    sent = True
                    yield out.payload
                if sent and not stream.ads:
                    # A per-type stream's progress may unblock its siblings (ordering rules).
                    for other in self.nodes.get(stream.node_id, ()):
                        if other is not stream:
                            other.wake.set()
                wait = stream.gate_retry_in()
                if wait is not None and retry is None:
                    def _retry() -> None:
                        nonlocal retry
                        retry = None
                        stream.wake.set()

                    retry = asyncio.get_running_loop().call_later(wait + 0.01, _retry)
        finally:
            if retry is not None:
                retry.cancel()
            reader.cancel()
            self.streams.pop(stream.id, None)
            if stream.id in self._registered:
                self._registered.discard(stream.id)
                peers = self.nodes.get(stream.node_id)
                if peers is not None:
                    peers.discard(stream)
                    if not peers:
                        del self.nodes[stream.node_id]
                    for other in peers:
                        other.wake.set()
            stream.close()

    def _refused(self, stream: Stream, reason: str) -> None:
        log.warning("refused xDS stream from %s: %s", stream.peer, reason)
        self.observer.stream_refused(reason, stream.peer)
        self.refusals.append({"at": time.time(), "peer": stream.peer, "reason": reason})

    def status(self) -> list[dict[str, object]]:
        """One entry per connected node; a node on the standalone services has several streams."""
        nodes: dict[str, dict[str, object]] = {}
        for stream in sorted(self.streams.values(), key=lambda s: s.id):
            if stream.node is None:
                continue
            st = stream.status()
            entry = nodes.get(stream.node_id)
            if entry is None:
                entry = nodes[stream.node_id] = {**st, "streams": [stream.id], "types": dict(st["types"])}  # type: ignore[arg-type]
                del entry["stream_id"]
            else:
                entry["streams"].append(stream.id)  # type: ignore[attr-defined]
                entry["types"].update(st["types"])  # type: ignore[attr-defined]
        return [nodes[k] for k in sorted(nodes)]
