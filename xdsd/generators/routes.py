"""RDS: route configurations. Routes are matched in the order the config lists them."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as _rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2

from xdsd.authz.contract import SERVICE_KEY
from xdsd.generators import processing as ext_proc
from xdsd.generators.endpoints import cluster_name
from xdsd.model import Gateway, Mesh
from xdsd.model.processing import Processing
from xdsd.model.traffic import Fault, Retries, Route

FAULT_FILTER = "envoy.filters.http.fault"


def _seconds(d: duration_pb2.Duration, seconds: float) -> None:
    d.FromNanoseconds(int(round(seconds * 1e9)))


def _percent(p: percent_pb2.FractionalPercent, percent: float) -> None:
    # Per million, so that fractions of a percent survive (0.5% = 5000 / 1000000).
    p.numerator = int(round(percent * 10_000))
    p.denominator = percent_pb2.FractionalPercent.MILLION


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


def fault_config(fault: Fault) -> fault_pb2.HTTPFault:
    """Per-route config of the fault filter (the listener's own config injects nothing)."""
    out = fault_pb2.HTTPFault()
    if fault.delay is not None:
        _seconds(out.delay.fixed_delay, fault.delay.duration)
        _percent(out.delay.percentage, fault.delay.percent)
    if fault.abort is not None:
        out.abort.http_status = fault.abort.status
        _percent(out.abort.percentage, fault.abort.percent)
    return out


def _match(r: _rc.Route, route: Route) -> None:
    if route.prefix is not None:
        r.match.prefix = route.prefix
    elif route.path is not None:
        r.match.path = route.path
    elif route.regex is not None:
        r.match.safe_regex.regex = route.regex  # RE2, must match the whole path
    methods = sorted({m.upper() for m in route.methods})
    if len(methods) == 1:
        r.match.headers.add(name=":method").string_match.exact = methods[0]
    elif methods:
        r.match.headers.add(name=":method").string_match.safe_regex.regex = "|".join(methods)
    for name, value in route.headers.items():
        r.match.headers.add(name=name).string_match.exact = value


def _route(r: _rc.Route, route: Route, mesh: Mesh, default_service: str | None = None) -> None:
    """One route: its match, its target (cluster or weighted clusters), rewrite, mirror, hash key,
    fault and retry/timeout policy (the route's own, else its first service's)."""
    _match(r, route)
    action = r.route
    if route.split:
        for d in route.split:
            action.weighted_clusters.clusters.add(name=cluster_name(d.service or default_service or "", d.subset)).weight.value = d.weight
        service = route.split[0].service or default_service or ""
    else:
        service = route.service or default_service or ""
        action.cluster = cluster_name(service, route.subset)
    if route.rewrite is not None:
        if route.rewrite.prefix is not None:
            action.prefix_rewrite = route.rewrite.prefix
        if route.rewrite.host is not None:
            action.host_rewrite_literal = route.rewrite.host
    if route.mirror is not None:
        mirror = action.request_mirror_policies.add(
            cluster=cluster_name(route.mirror.service or default_service or "", route.mirror.subset))
        _percent(mirror.runtime_fraction.default_value, route.mirror.percent)
    # ring_hash / maglev hash on a key the route computes (the services' hash_on, once each).
    hashes: list[tuple[str | None, str | None]] = []
    for target, _ in route.destinations(default_service):
        lb = mesh.services[target].load_balancer
        if lb is not None and lb.hash_on is not None and (key := (lb.hash_on.header, lb.hash_on.cookie)) not in hashes:
            hashes.append(key)
    for header, cookie in hashes:
        policy = action.hash_policy.add()
        if header is not None:
            policy.header.header_name = header
        else:
            policy.cookie.name = cookie or ""
    if route.fault is not None:
        r.typed_per_filter_config[FAULT_FILTER].Pack(fault_config(route.fault))
    target = mesh.services[service]
    apply_policy(action, route.retries or target.retries, route.timeout if route.timeout is not None else target.timeout)


def gateway_routes(name: str, gateway: Gateway, mesh: Mesh) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=name, domains=["*"])
    if name in mesh.authorization:
        # The gateway's own policy decides (its callers come from outside: no mesh principal).
        vhost.typed_per_filter_config["envoy.filters.http.ext_authz"].Pack(_authz_context(name))
    for i, route in enumerate(gateway.routes):
        _route(r := vhost.routes.add(), route, mesh)
        if route.processing is not None:
            ext_proc.enable(r, i, route.processing)  # the route's own ext_proc filter (disabled for the others)
    return rc


def outbound_route_name(upstream: str) -> str:
    return f"outbound|{upstream}"


def outbound_routes(upstream: str, mesh: Mesh) -> route_pb2.RouteConfiguration:
    """What a sidecar's app reaches at 127.0.0.1:<port>: the upstream's own ``routes`` (to its
    subsets), then everything else to the whole service. Depends on the upstream's Service only."""
    name = outbound_route_name(upstream)
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=upstream, domains=["*"])
    own = mesh.services[upstream].routes
    catch_all = any(r.prefix == "/" and not r.methods and not r.headers for r in own)
    for route in own if catch_all else [*own, Route(prefix="/")]:
        _route(vhost.routes.add(), route, mesh, default_service=upstream)
    return rc


def inbound_routes(service: str, app_cluster: str, processing: Processing | None = None) -> route_pb2.RouteConfiguration:
    """Mesh traffic that passed mTLS goes to the local app."""
    rc = route_pb2.RouteConfiguration(name=f"inbound|{service}")
    vhost = rc.virtual_hosts.add(name=f"inbound|{service}", domains=["*"])
    r = vhost.routes.add()
    if ext_proc.wants_identity_responses(processing):
        r.request_headers_to_remove.append("accept-encoding")
    r.match.prefix = "/"
    r.route.cluster = app_cluster
    # Tell the authorization service which service this is (the destination of the request).
    r.typed_per_filter_config["envoy.filters.http.ext_authz"].Pack(_authz_context(service))
    return rc


def _authz_context(destination: str) -> ext_authz_pb2.ExtAuthzPerRoute:
    per_route = ext_authz_pb2.ExtAuthzPerRoute()
    per_route.check_settings.context_extensions[SERVICE_KEY] = destination
    return per_route
