"""LDS: listeners with an HTTP connection manager (routes from RDS, or inline for inbound)."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import http_status_pb2

from xdsd.authz.contract import DECISION_HEADER, DRY_RUN_HEADER, JWT_METADATA_NAMESPACE
from xdsd.authz.contract import XFCC as XFCC_HEADER
from xdsd.authz.contract import path_prefix as authz_path_prefix
from xdsd.generators import authn as authn_filters
from xdsd.generators import processing as ext_proc
from xdsd.generators.node import NodeGroup, config_source
from xdsd.generators.tls import downstream_socket
from xdsd.model import Gateway
from xdsd.model.mesh import Policy
from xdsd.model.processing import Processing

HCM_FILTER = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
AUTHZ_TIMEOUT_MS = 500
ROUTER_FILTER = "envoy.filters.http.router"
FAULT_FILTER = "envoy.filters.http.fault"
TRACE_HEADERS = ("traceparent", "tracestate")  # the decision's span joins the request's trace
DENIAL_HEADERS = ("content-type", DECISION_HEADER, DRY_RUN_HEADER)  # from a denial to the client


def ext_authz_filter(group: NodeGroup, destination: str, headers: tuple[str, ...] = (),
                     request_auth: bool = False) -> hcm_pb2.HttpFilter:
    """Ask xdsd about every request to ``destination``; deny if it cannot answer (fail closed).

    Over HTTP/1.1 when the node's bootstrap has xdsd's authz HTTP cluster (``--authz-http-port``):
    a third of gRPC's cost per check. The destination travels in the path prefix, the caller's
    identity in ``x-forwarded-client-cert`` (set by the inbound listener from the verified peer
    certificate); only the headers the policy reads are sent (``headers``), never ``authorization``
    unless a rule matches on it. Otherwise over gRPC on the node's own xDS cluster.

    ``request_auth``: the policy matches on end users (a verified JWT's claims), which reach xdsd
    only as the jwt_authn filter's dynamic metadata: that needs a gRPC check (an HTTP check carries
    headers only, and a header could be forged), whatever the node's bootstrap offers."""
    authz = ext_authz_pb2.ExtAuthz(transport_api_version=config_source_pb2.V3, failure_mode_allow=False)
    if request_auth:
        authz.metadata_context_namespaces.append(JWT_METADATA_NAMESPACE)
    if group.authz_cluster and not request_auth:
        http = authz.http_service
        http.server_uri.uri = "http://xdsd-authz"
        http.server_uri.cluster = group.authz_cluster
        http.server_uri.timeout.FromMilliseconds(AUTHZ_TIMEOUT_MS)
        http.path_prefix = authz_path_prefix(destination)
        for name in (XFCC_HEADER, *TRACE_HEADERS, *headers):
            authz.allowed_headers.patterns.add(exact=name)
        if "authorization" not in headers:
            authz.disallowed_headers.patterns.add(exact="authorization")
        reply = http.authorization_response
        for name in DENIAL_HEADERS:
            reply.allowed_client_headers.patterns.add(exact=name)
        reply.allowed_client_headers_on_success.patterns.add(exact=DRY_RUN_HEADER)
    else:
        authz.grpc_service.envoy_grpc.cluster_name = group.xds_cluster
        authz.grpc_service.timeout.FromMilliseconds(AUTHZ_TIMEOUT_MS)
    authz.status_on_error.code = http_status_pb2.Forbidden
    f = hcm_pb2.HttpFilter(name=EXT_AUTHZ_FILTER)
    f.typed_config.Pack(authz)
    return f


def uses_request_auth(policy: Policy | None) -> bool:
    """Some rule of the policy matches on a verified JWT (request principals or claims)."""
    return policy is not None and any(m.uses_request_auth() for r in policy.rules for m in (r.allow, r.deny)
                                      if m is not None)


def policy_headers(policy: Policy | None) -> tuple[str, ...]:
    """The request headers an authorization policy matches on (lower case, sorted; validated names)."""
    if policy is None:
        return ()
    return tuple(sorted({k for r in policy.rules for m in (r.allow, r.deny) if m is not None for k in m.headers
                         if not k.startswith(":")}))  # Envoy always sends method, path and host


def http_connection_manager(stat_prefix: str, group: NodeGroup, *, rds: str | None = None,
                            inline: route_pb2.RouteConfiguration | None = None,
                            edge: bool = False, authz: str | None = None,
                            authz_headers: tuple[str, ...] = (), authn: tuple[hcm_pb2.HttpFilter, ...] = (),
                            request_auth: bool = False,
                            processing: tuple[hcm_pb2.HttpFilter, ...] = ()) -> hcm_pb2.HttpConnectionManager:
    """``authz``: the destination whose policy ext_authz checks for each request (None: no check).
    ``authn``: end-user authentication filters (``authn.filters``), run before the check;
    ``request_auth``: the policy reads their verified payload.
    ``processing``: ext_proc filters (``generators.processing``), after ext_authz."""
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    if rds is not None:
        hcm.rds.config_source.CopyFrom(config_source(group))
        hcm.rds.route_config_name = rds
    elif inline is not None:
        hcm.route_config.CopyFrom(inline)
    # Route on the normalized path so that `//x`, `/a/../x` and `%2F` cannot dodge a prefix.
    hcm.normalize_path.value = True
    hcm.merge_slashes = True
    # %2F and %5C become slashes before normalization, so `/%2Fadmin` is seen (and authorized) as `/admin`.
    hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD
    if edge:
        hcm.use_remote_address.value = True
    hcm.http_filters.extend(authn)
    if any(f.name == authn_filters.JWT_FILTER for f in authn):
        hcm.local_reply_config.mappers.append(authn_filters.audience_failure_as_401())
    if authz is not None:
        hcm.http_filters.append(ext_authz_filter(group, authz, authz_headers, request_auth))
    hcm.http_filters.extend(processing)
    if rds is not None:
        # Fault injection, configured per route (typed_per_filter_config); this config injects nothing.
        hcm.http_filters.add(name=FAULT_FILTER).typed_config.Pack(fault_pb2.HTTPFault())
    router = hcm.http_filters.add(name=ROUTER_FILTER)
    router.typed_config.Pack(router_pb2.Router())
    return hcm


def _listener(name: str, address: str, port: int, hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name)
    sock = listener.address.socket_address
    sock.address = address
    sock.port_value = port
    chain = listener.filter_chains.add()
    f = chain.filters.add(name=HCM_FILTER)
    f.typed_config.Pack(hcm)
    return listener


def gateway_listener(name: str, gateway: Gateway, group: NodeGroup,
                     authz: tuple[str, ...] | None = None, authn: tuple[hcm_pb2.HttpFilter, ...] = (),
                     request_auth: bool = False) -> listener_pb2.Listener:
    """``authz``: the gateway has an authorization policy (matching on these headers), so every
    request is checked (fail closed); None: it has none."""
    hcm = http_connection_manager(name, group, rds=name, edge=True, authz=None if authz is None else name,
                                  authz_headers=authz or (), authn=authn, request_auth=request_auth,
                                  processing=tuple(ext_proc.gateway_filters(name, gateway, group)))
    return _listener(name, gateway.listen.address, gateway.listen.port, hcm)


def outbound_listener(upstream: str, port: int, route_name: str, group: NodeGroup) -> listener_pb2.Listener:
    """The app's way out: plaintext on 127.0.0.1:<port>, never reachable from other machines."""
    hcm = http_connection_manager(f"outbound_{upstream}", group, rds=route_name)
    return _listener(f"outbound|{port}|{upstream}", "127.0.0.1", port, hcm)


def inbound_listener(service: str, address: str, port: int, routes: route_pb2.RouteConfiguration,
                     group: NodeGroup, own_id: str, trust_domain: str,
                     authz_headers: tuple[str, ...] = (), authn: tuple[hcm_pb2.HttpFilter, ...] = (),
                     request_auth: bool = False, processing: Processing | None = None) -> listener_pb2.Listener:
    """The way in: mTLS with a client certificate from the trust domain, then the local app.
    The app learns the caller's SPIFFE ID from ``x-forwarded-client-cert`` (URI=...).
    ``processing``: the service's ext_proc step (after ext_authz)."""
    steps = () if processing is None else (ext_proc.service_filter(group, service, processing),)
    hcm = http_connection_manager(f"inbound_{service}", group, inline=routes, authz=service, authz_headers=authz_headers,
                                  authn=authn, request_auth=request_auth, processing=steps)
    hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    hcm.set_current_client_cert_details.uri = True
    listener = _listener(f"inbound|{port}", address, port, hcm)
    listener.filter_chains[0].transport_socket.CopyFrom(downstream_socket(group, own_id, trust_domain))
    return listener
