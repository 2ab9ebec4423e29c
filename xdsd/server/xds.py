"""The xDS gRPC services: ADS and the standalone CDS/EDS/LDS/RDS services, state of the world and
delta. Responses leave as pre-assembled bytes (identity serializer): see ``encode``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xdsd import typeurls
from xdsd.auth.access import Denied
from xdsd.cache import SnapshotCache
from xdsd.cache.cache import GroupFailed
from xdsd.server.observer import NullObserver, StreamObserver
from xdsd.server.stream import Authenticator, ProtocolError, Refused, SecretsRefused, Stream, WakeQueue

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


class _LogBudget:
    """A token bucket for log lines about refusals: a flood of bad callers must not flood the log."""

    BURST = 20.0
    PER_SECOND = 5.0

    def __init__(self) -> None:
        self.tokens = self.BURST
        self.at = time.monotonic()
        self.suppressed = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.BURST, self.tokens + (now - self.at) * self.PER_SECOND)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False


def is_loopback_peer(peer: str) -> bool:
    """``ipv4:127.0.0.1:5`` / ``ipv6:[::1]:5`` (grpc's peer strings) -> on a loopback address?"""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class XdsServer:
    """Runs the protocol for every stream; holds the registry of open streams for status pages."""

    def __init__(
        self, cache: SnapshotCache, observer: StreamObserver | None = None, authenticator: Authenticator | None = None,
        *, plaintext: bool = False,
    ) -> None:
        self.cache = cache
        self.authenticator = authenticator
        # Serving xDS without TLS: private keys go only to peers on a loopback address.
        self.plaintext = plaintext
        self.refusals: deque[dict[str, object]] = deque(maxlen=100)
        self._log_budget = _LogBudget()
        self.observer: StreamObserver = observer or NullObserver()
        self.streams: dict[int, Stream] = {}
        self.next_expiry = float("inf")  # the earliest token expiry among the open streams
        self.nodes: dict[str, set[Stream]] = {}  # node id -> its open streams
        self._registered: set[int] = set()
        self._wakes = WakeQueue()

    def method_handlers(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        """Every xDS method, by service: register with ``add_registered_method_handlers``."""
        out: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for service, sotw_method, delta_method, fixed in SERVICES:
            out[service] = {
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
            }
        return out

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The same methods as generic handlers (``add_generic_rpc_handlers``)."""
        return [grpc.method_handlers_generic_handler(service, methods)
                for service, methods in self.method_handlers().items()]

    def register(self, server: Any) -> None:
        """Add every xDS method to a grpc.aio.Server or an xdsd.transport.GrpcServer."""
        for service, methods in self.method_handlers().items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
            server.add_registered_method_handlers(service, methods)

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

    def _node_streams(self, node_id: str) -> Iterable[Stream]:
        return self.nodes.get(node_id, ())

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
            secrets_allowed=not self.plaintext or is_loopback_peer(context.peer()),
            siblings=self._node_streams,
        )

    async def _run(
        self,
        stream: Stream,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        on_request: Callable[[Any], None],
    ) -> AsyncIterator[bytes]:
        async def read() -> None:
            try:
                async for req in requests:
                    on_request(req)
            except (ProtocolError, Refused, SecretsRefused, GroupFailed) as exc:
                exc.__traceback__ = None  # its frames hold the request (megabytes); the message is enough
                stream.failure = exc
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            except Exception as exc:  # noqa: BLE001 - the transport ended the call (its status is sent)
                log.debug("xDS stream %d: reading ended: %s", stream.id, exc)
            finally:
                stream.ended = True
                stream.wake.set()

        self.streams[stream.id] = stream
        reader = asyncio.create_task(read())
        retry: asyncio.TimerHandle | None = None
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                exc = stream.failure
                if exc is not None:
                    if isinstance(exc, Refused):
                        self._refused(stream, exc.denied)
                        code = (grpc.StatusCode.UNAUTHENTICATED if exc.denied.unauthenticated
                                else grpc.StatusCode.PERMISSION_DENIED)
                        await context.abort(code, f"xdsd: {exc}")
                    if isinstance(exc, SecretsRefused):
                        self._refused(stream, Denied("secrets-over-plaintext", str(exc), unauthenticated=False))
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"xdsd: {exc}")
                    if isinstance(exc, GroupFailed):
                        await context.abort(grpc.StatusCode.INTERNAL, str(exc))
                    self.refused("invalid-request", str(exc)[:500], stream.peer, "xDS stream", stream.node_id)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if stream.ended:
                    return
                if stream.node is not None and stream.id not in self._registered:
                    self._registered.add(stream.id)
                    self.nodes.setdefault(stream.node_id, set()).add(stream)
                    if stream.caller is not None and stream.caller.expires_at < self.next_expiry:
                        self.next_expiry = stream.caller.expires_at
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

    def _refused(self, stream: Stream, denied: Denied) -> None:
        self.refused(denied.reason, denied.message, stream.peer, "xDS stream", stream.node_id)

    def refused(self, reason: str, message: str, peer: str, what: str, node_id: str = "") -> None:
        """A refused stream or call: logged (at most a few lines a second), counted by reason,
        listed on /debug/refused."""
        if self._log_budget.take():
            suppressed, self._log_budget.suppressed = self._log_budget.suppressed, 0
            log.warning("refused %s from %s%s: %s: %s%s", what, peer, f" (node {node_id!r})" if node_id else "",
                        reason, message, f" ({suppressed} more refusals not logged)" if suppressed else "")
        self.observer.stream_refused(reason, peer)
        self.refusals.append({"at": time.time(), "peer": peer, "what": what, "node_id": node_id or None,
                              "reason": f"{reason}: {message}"})

    async def enforce_tokens(self, refresh: Callable[[], bool], still_valid: Callable[[object], Denied | None],
                             stop: asyncio.Event, every: float = 0.5) -> None:
        """Keep up with revocations and key changes (``refresh`` says whether any happened) and with
        expiring tokens: the streams of a revoked or expired token end within ``every`` seconds."""
        while not stop.is_set():
            if refresh() or time.time() >= self.next_expiry:
                ended = self.revalidate(still_valid)
                if ended:
                    log.info("ended %d xDS streams whose token was revoked or expired", ended)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    def revalidate(self, still_valid: Callable[[object], Denied | None]) -> int:
        """End the streams whose caller is no longer valid (revoked, expired) with UNAUTHENTICATED;
        they are gone within a loop iteration. Returns how many were ended."""
        ended = 0
        earliest = float("inf")
        for stream in list(self.streams.values()):
            if stream.caller is None or stream.failure is not None or stream.ended:
                continue
            denied = still_valid(stream.caller)
            if denied is not None:
                stream.failure = Refused(denied)
                stream.wake.set()
                ended += 1
            else:
                earliest = min(earliest, stream.caller.expires_at)
        self.next_expiry = earliest
        return ended

    # -- the fleet, for staged rollouts ----------------------------------------------------------

    def clusters(self) -> dict[str, list[str]]:
        """node.cluster -> the ids of its connected nodes."""
        out: dict[str, list[str]] = {}
        for node_id, streams in self.nodes.items():
            for stream in streams:
                if stream.group is not None:
                    out.setdefault(stream.cluster, []).append(node_id)
                    break
        return out

    def set_canary(self, node_ids: Iterable[str], canary: bool) -> None:
        for node_id in node_ids:
            for stream in list(self.nodes.get(node_id, ())):
                stream.regroup(canary)

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
