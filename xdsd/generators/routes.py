"""RDS: route configurations. A gateway's routes are matched in the order the config lists them."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2

from xdsd.model import Gateway


def gateway_routes(name: str, gateway: Gateway) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vhost = rc.virtual_hosts.add(name=name, domains=["*"])
    for route in gateway.routes:
        r = vhost.routes.add()
        r.match.prefix = route.prefix
        r.route.cluster = route.service
    return rc
