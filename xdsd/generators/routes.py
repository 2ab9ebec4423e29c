"""RDS: route configurations. Routes are matched in the order the config lists them."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as _rc  # noqa: F401 - RouteAction lives here
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import duration_pb2

from xdsd.model import Gateway, Mesh
from xdsd.model.mesh import Retries


def _seconds(d: duration_pb2.Duration, seconds: float) -> None:
    d.FromNanoseconds(int(round(seconds * 1e9)))


def apply_policy(action: _rc.RouteAction, retries: Retries | None, timeout: float | None) -> None:
    """Retries and timeout on a route action (Envoy's RetryPolicy; num_retries = attempts - 1)."""
    if timeout is not None:
        _seconds(action.timeout, timeout)
    if retries is None:
        return
    policy = action.retry_policy
    policy.retry_on = ",".join(retries.retry_on)
    policy.num_retries.value = retries.attempts - 1
    policy.retriable_status_codes.extend(retries.status_codes)
    if retries.per_try_timeout is not None:
        _seconds(policy.per_try_timeout, retries.per_try_timeout)
    if retries.backoff is not None:
        _seconds(policy.retry_back_off.base_interval, retries.backoff.base)
        if retries.backoff.max is not None:
            _seconds(policy.retry_back_off.max_interval, retries.backoff.max)
    # Do not retry on the same host when another is available.
    policy.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts").typed_config.Pack(
        previous_hosts_pb2.PreviousHostsPredicate()
    )
    policy.host_selection_retry_max_attempts = 3


def gateway_routes(name: str, gateway: Gateway, mesh: Mesh) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=name, domains=["*"])
    for route in gateway.routes:
        r = vhost.routes.add()
        r.match.prefix = route.prefix
        r.route.cluster = route.service
        service = mesh.services[route.service]
        apply_policy(r.route, route.retries or service.retries,
                     route.timeout if route.timeout is not None else service.timeout)
    return rc


def outbound_route_name(upstream: str) -> str:
    return f"outbound|{upstream}"


def outbound_routes(upstream: str, mesh: Mesh) -> route_pb2.RouteConfiguration:
    """What a sidecar's app reaches at 127.0.0.1:<port>: every request goes to ``upstream``."""
    name = outbound_route_name(upstream)
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=upstream, domains=["*"])
    r = vhost.routes.add()
    r.match.prefix = "/"
    r.route.cluster = upstream
    service = mesh.services[upstream]
    apply_policy(r.route, service.retries, service.timeout)
    return rc


def inbound_routes(service: str, app_cluster: str) -> route_pb2.RouteConfiguration:
    """Mesh traffic that passed mTLS goes to the local app."""
    rc = route_pb2.RouteConfiguration(name=f"inbound|{service}")
    vhost = rc.virtual_hosts.add(name=f"inbound|{service}", domains=["*"])
    r = vhost.routes.add()
    r.match.prefix = "/"
    r.route.cluster = app_cluster
    # Tell the authorization service which service this is (the destination of the request).
    per_route = ext_authz_pb2.ExtAuthzPerRoute()
    per_route.check_settings.context_extensions["xdsd.service"] = service
    r.typed_per_filter_config["envoy.filters.http.ext_authz"].Pack(per_route)
    return rc
