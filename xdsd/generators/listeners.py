"""LDS: listeners with an HTTP connection manager that takes its routes from RDS."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from xdsd.generators.node import NodeGroup, config_source
from xdsd.model import Gateway

HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"


def http_connection_manager(stat_prefix: str, route_config: str, group: NodeGroup, *, edge: bool) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    hcm.rds.config_source.CopyFrom(config_source(group))
    hcm.rds.route_config_name = route_config
    # Route on the normalized path so that `//x`, `/a/../x` and `%2F` cannot dodge a prefix.
    hcm.normalize_path.value = True
    hcm.merge_slashes = True
    hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT
    if edge:
        hcm.use_remote_address.value = True
    router = hcm.http_filters.add(name=ROUTER_FILTER)
    router.typed_config.Pack(router_pb2.Router())
    return hcm


def gateway_listener(name: str, gateway: Gateway, group: NodeGroup) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name)
    sock = listener.address.socket_address
    sock.address = gateway.listen.address
    sock.port_value = gateway.listen.port
    chain = listener.filter_chains.add()
    f = chain.filters.add(name=HCM_FILTER)
    f.typed_config.Pack(http_connection_manager(name, name, group, edge=True))
    return listener
