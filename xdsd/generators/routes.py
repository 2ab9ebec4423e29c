"""RDS: route configurations. Routes are matched in the order the config lists them."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

from xdsd.model import Gateway


def gateway_routes(name: str, gateway: Gateway) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=name, domains=["*"])
    for route in gateway.routes:
        r = vhost.routes.add()
        r.match.prefix = route.prefix
        r.route.cluster = route.service
    return rc


def outbound_route_name(upstream: str) -> str:
    return f"outbound|{upstream}"


def outbound_routes(upstream: str) -> route_pb2.RouteConfiguration:
    """What a sidecar's app reaches at 127.0.0.1:<port>: every request goes to ``upstream``."""
    name = outbound_route_name(upstream)
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=upstream, domains=["*"])
    r = vhost.routes.add()
    r.match.prefix = "/"
    r.route.cluster = upstream
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
