"""Telemetry resources (``mesh.telemetry``): pure, no I/O.

- **stats**: a listener ``stats|<port>`` whose HTTP connection manager routes ``GET /stats/prometheus``
  to the cluster ``xdsd-admin``, which is the node's own admin interface (its address comes from the
  node metadata ``xdsd.admin_address`` that ``xdsd bootstrap`` writes; default 127.0.0.1:9901). Only
  that path is reachable: everything else on the port is a 404, so the admin API stays private.
- **access_log** and **tracing**: every HTTP connection manager of the node's own listeners
  (gateway, inbound, outbound) gets a JSON file access log and the OpenTelemetry tracer, which
  sends spans over OTLP/gRPC to the cluster ``xdsd-otel-collector``. The tracer reads and writes
  W3C ``traceparent``: a request keeps one trace id across gateway and sidecars as long as the apps
  in between forward that header.

The other generators do not know about telemetry: ``extend`` decorates what they built (copies,
never the shared memoized messages) and adds its own resources.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.generators.listeners import HCM_FILTER, ROUTER_FILTER
from xdsd.generators.memo import Memo, NoMemo
from xdsd.generators.node import NodeGroup
from xdsd.generators.roles import GATEWAY, SIDECAR, role_of
from xdsd.model import Mesh
from xdsd.model.fields import is_ip
from xdsd.model.telemetry import AccessLog, Telemetry, Tracing, stats_address

ADMIN_CLUSTER = "xdsd-admin"
COLLECTOR_CLUSTER = "xdsd-otel-collector"
STATS_PATH = "/stats/prometheus"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:9901"  # xdsd bootstrap's default admin address
ACCESS_LOGGER = "envoy.access_loggers.file"
OTEL_TRACER = "envoy.tracers.opentelemetry"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_NO_MEMO = NoMemo()


def extend(mesh: Mesh, group: NodeGroup, out: dict[str, list[Message]], memo: Memo = _NO_MEMO) -> None:
    """Add the node's telemetry to ``out`` (the other generators' result for ``group``)."""
    telemetry = mesh.telemetry
    if not telemetry.enabled:
        return
    role = role_of(mesh, group.cluster)
    if role == GATEWAY:
        own_address = mesh.gateways[group.cluster].listen.address
    elif role == SIDECAR and (sidecar := mesh.services[group.cluster].sidecar) is not None:
        own_address = group.inbound_address or sidecar.inbound.address
    else:
        return
    service = group.cluster
    if (telemetry.access_log is not None and telemetry.access_log.enabled) or telemetry.tracing is not None:
        out[typeurls.LISTENER] = [
            memo.get(("telemetry-lds", service, listener.name), (listener, telemetry),
                     lambda listener=listener: decorate_listener(listener, telemetry, service))  # type: ignore[misc]
            for listener in out[typeurls.LISTENER]
        ]
    if telemetry.tracing is not None:
        tracing = telemetry.tracing
        # New lists, never appended to: the generators' lists may be memoized (reused next revision).
        out[typeurls.CLUSTER] = [*out[typeurls.CLUSTER],
                                 memo.get(("telemetry-otel",), (tracing,), lambda: collector_cluster(tracing))]
    if telemetry.stats is not None:
        address, port, _ = stats_address(mesh, service, own_address)
        admin = group.admin_address or DEFAULT_ADMIN_ADDRESS
        out[typeurls.CLUSTER] = [*out[typeurls.CLUSTER],
                                 memo.get(("telemetry-admin", admin), (), lambda: admin_cluster(admin))]
        out[typeurls.LISTENER] = [*out[typeurls.LISTENER],
                                  memo.get(("telemetry-stats", address, port), (), lambda: stats_listener(address, port))]


def direction_of(listener_name: str) -> str:
    if listener_name.startswith("inbound|"):
        return "inbound"
    if listener_name.startswith("outbound|"):
        return "outbound"
    return "gateway"


def decorate_listener(listener: listener_pb2.Listener, telemetry: Telemetry, service: str) -> listener_pb2.Listener:
    """A copy of ``listener`` whose HTTP connection managers log and trace."""
    direction = direction_of(listener.name)
    decorated = listener_pb2.Listener()
    decorated.CopyFrom(listener)
    if telemetry.tracing is not None:
        # The tracer's span kind follows the listener's direction (SERVER in, CLIENT out).
        decorated.traffic_direction = (base_pb2.INBOUND if direction == "inbound" else base_pb2.OUTBOUND)
    for chain in decorated.filter_chains:
        for f in chain.filters:
            if f.name != HCM_FILTER:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            decorate_hcm(hcm, telemetry, service, direction)
            f.typed_config.Pack(hcm, deterministic=True)
    return decorated


def decorate_hcm(hcm: hcm_pb2.HttpConnectionManager, telemetry: Telemetry, service: str, direction: str) -> None:
    if telemetry.access_log is not None and telemetry.access_log.enabled:
        hcm.access_log.append(access_log(telemetry.access_log, service, direction))
    if telemetry.tracing is not None:
        hcm.tracing.CopyFrom(tracing(telemetry.tracing, service))


def access_log(config: AccessLog, service: str, direction: str) -> accesslog_pb2.AccessLog:
    """One JSON object per request, written to ``config.path``."""
    log = file_pb2.FileAccessLog(path=config.path)
    fmt = log.log_format
    for key, operator in config.format(service, direction).items():
        fmt.json_format.fields[key].string_value = operator
    entry = accesslog_pb2.AccessLog(name=ACCESS_LOGGER)
    entry.typed_config.Pack(log, deterministic=True)
    return entry


def tracing(config: Tracing, service: str) -> hcm_pb2.HttpConnectionManager.Tracing:
    otel = opentelemetry_pb2.OpenTelemetryConfig(service_name=config.service_name or service)
    otel.grpc_service.envoy_grpc.cluster_name = COLLECTOR_CLUSTER
    otel.grpc_service.timeout.FromMilliseconds(1000)
    t = hcm_pb2.HttpConnectionManager.Tracing()
    t.provider.name = OTEL_TRACER
    t.provider.typed_config.Pack(otel)
    t.random_sampling.value = config.sampling
    t.spawn_upstream_span.value = True  # a CLIENT span per upstream call, as well as the HCM's own span
    return t


def collector_cluster(config: Tracing) -> cluster_pb2.Cluster:
    """The OTLP/gRPC collector the tracer exports to (HTTP/2)."""
    host, port = config.collector_host, config.collector_port
    return _cluster(COLLECTOR_CLUSTER, host, port, http2=True)


def admin_cluster(admin_address: str) -> cluster_pb2.Cluster:
    """The node's own admin interface (HOST:PORT)."""
    host, _, port = admin_address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    return _cluster(ADMIN_CLUSTER, host, int(port), http2=False)


def _cluster(name: str, host: str, port: int, *, http2: bool) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC if is_ip(host) else cluster_pb2.Cluster.STRICT_DNS)
    cluster.connect_timeout.FromMilliseconds(1000)
    cla = cluster.load_assignment
    cla.cluster_name = name
    sock = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sock.address = host
    sock.port_value = port
    if http2:
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(opts)
    return cluster


def stats_listener(address: str, port: int) -> listener_pb2.Listener:
    """``GET /stats/prometheus`` on ``address:port``, answered by the node's admin interface."""
    routes = route_pb2.RouteConfiguration(name="stats")
    vh = routes.virtual_hosts.add(name="stats", domains=["*"])
    stats = vh.routes.add()
    stats.match.path = STATS_PATH
    stats.route.cluster = ADMIN_CLUSTER
    stats.route.timeout.FromSeconds(5)
    other = vh.routes.add()
    other.match.prefix = "/"
    other.direct_response.status = 404
    other.direct_response.body.inline_string = f"only {STATS_PATH} is served here\n"
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="xdsd_stats", route_config=routes)
    hcm.http_filters.add(name=ROUTER_FILTER).typed_config.Pack(router_pb2.Router())
    listener = listener_pb2.Listener(name=f"stats|{port}")
    sock = listener.address.socket_address
    sock.address = address
    sock.port_value = port
    listener.filter_chains.add().filters.add(name=HCM_FILTER).typed_config.Pack(hcm)
    return listener


__all__ = ["ADMIN_CLUSTER", "COLLECTOR_CLUSTER", "extend"]
