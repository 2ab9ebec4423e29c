"""Every method on every port, and who may call it. A gRPC method or admin route that is not in
these tables is refused (PERMISSION_DENIED / 403): nothing ships open by accident. README's
"Security model" table lists the same entries; a test keeps the two, and the running server's
registered methods and routes, in step."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import grpc

from xdsd.auth.access import Access, Denied, token_from_metadata


class Rule(StrEnum):
    """Who may call. The binding checks (which node, which service) are made by the handler once it
    has the request; the token itself is checked when the call starts."""

    PUBLIC = "anyone"
    NODE = "node token of that node and service"  # xDS: bound to the first request's node.id/cluster
    SERVICE = "node token of the service in the request"  # registration, ext_authz
    MESH = "any valid token (node or operator)"
    OPERATOR = "operator token"
    LOCAL_OR_OPERATOR = "anyone on a loopback admin address, else an operator token"


_XDS = (
    ("envoy.service.discovery.v3.AggregatedDiscoveryService", "StreamAggregatedResources", "DeltaAggregatedResources"),
    ("envoy.service.cluster.v3.ClusterDiscoveryService", "StreamClusters", "DeltaClusters"),
    ("envoy.service.endpoint.v3.EndpointDiscoveryService", "StreamEndpoints", "DeltaEndpoints"),
    ("envoy.service.listener.v3.ListenerDiscoveryService", "StreamListeners", "DeltaListeners"),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes"),
    ("envoy.service.secret.v3.SecretDiscoveryService", "StreamSecrets", "DeltaSecrets"),
)

# The xDS port (gRPC), by full method path.
GRPC_METHODS: dict[str, Rule] = {
    **{f"/{service}/{m}": Rule.NODE for service, *methods in _XDS for m in methods},
    "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus": Rule.OPERATOR,
    "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus": Rule.OPERATOR,
    "/envoy.service.auth.v3.Authorization/Check": Rule.SERVICE,
    "/envoy.service.ext_proc.v3.ExternalProcessor/Process": Rule.SERVICE,
    "/xdsd.v1.Registration/Register": Rule.SERVICE,
    "/xdsd.v1.Registration/Heartbeat": Rule.SERVICE,
    "/xdsd.v1.Registration/Deregister": Rule.SERVICE,
    "/xdsd.v1.Registration/List": Rule.MESH,
}

# The admin port (HTTP), by (method, route path as registered).
ADMIN_ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/metrics"): Rule.PUBLIC,
    ("GET", "/healthz"): Rule.PUBLIC,
    ("GET", "/readyz"): Rule.PUBLIC,
    ("GET", "/debug/proxies"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/config"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/refused"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/config_dump"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/loop"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/health"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/debug/replicas"): Rule.LOCAL_OR_OPERATOR,
    ("POST", "/v1/register"): Rule.SERVICE,
    ("POST", "/v1/heartbeat"): Rule.SERVICE,
    ("POST", "/v1/deregister"): Rule.SERVICE,
    ("GET", "/v1/instances"): Rule.MESH,
    ("POST", "/v1/config/diff"): Rule.OPERATOR,
    ("POST", "/v1/config/apply"): Rule.OPERATOR,
    ("GET", "/v1/config/history"): Rule.LOCAL_OR_OPERATOR,
    ("GET", "/v1/config/history/{revision}"): Rule.LOCAL_OR_OPERATOR,
    ("POST", "/v1/config/rollback"): Rule.OPERATOR,
}

# The ext_authz HTTP port: one route, every path under the prefix.
AUTHZ_HTTP_ROUTES: dict[tuple[str, str], Rule] = {("ANY", "/_xdsd/authz/<service>/<path>"): Rule.SERVICE}

# (method path, metadata, peer) -> None to let the call start, else the status to end it with.
CallGate = Callable[[str, tuple[tuple[str, "str | bytes"], ...], str], "tuple[grpc.StatusCode, str] | None"]
# (reason label, message, peer, method path): a refused call, for logs, metrics and /debug/refused.
OnRefused = Callable[[str, str, str, str], None]


def check(access: Access, rule: Rule, token: str | None) -> None:
    """The token check of ``rule`` (raises Denied). Binding to a node or service is the handler's."""
    if rule is Rule.PUBLIC:
        return
    if rule is Rule.OPERATOR:
        access.operator(token)
    elif rule in (Rule.NODE, Rule.SERVICE):
        caller = access.caller(token)
        if not caller.anonymous and caller.kind != "node":
            raise Denied("not-a-node", "this method needs a node token", unauthenticated=False)
    else:
        access.caller(token)


def grpc_gate(access: Access, on_refused: OnRefused | None = None) -> CallGate:
    """Checks a call's token against its method's rule when the call starts, before any request
    bytes are read (so an unauthenticated caller cannot make xdsd buffer anything)."""

    def gate(method: str, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> tuple[grpc.StatusCode, str] | None:
        rule = GRPC_METHODS.get(method)
        if rule is None:
            reason, message, code = "no-rule", f"no access rule for {method}", grpc.StatusCode.PERMISSION_DENIED
        else:
            try:
                check(access, rule, token_from_metadata(metadata))
                return None
            except Denied as exc:
                reason, message = exc.reason, exc.message
                code = grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
        if on_refused is not None:
            on_refused(reason, message, peer, method)
        return code, f"xdsd: {reason}: {message}"

    return gate


class GateInterceptor(grpc.aio.ServerInterceptor):
    """The same call-start check for grpcio's server (``xdsd serve --xds-transport grpcio``)."""

    def __init__(self, gate: CallGate) -> None:
        self.gate = gate

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        refusal = self.gate(handler_call_details.method, tuple(handler_call_details.invocation_metadata or ()), "")
        if refusal is None:
            return await continuation(handler_call_details)
        code, details = refusal
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def deny(request_or_iterator, context):  # type: ignore[no-untyped-def]
            await context.abort(code, details)

        async def deny_stream(request_or_iterator, context):  # type: ignore[no-untyped-def]
            await context.abort(code, details)
            yield  # pragma: no cover - makes this an async generator

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
