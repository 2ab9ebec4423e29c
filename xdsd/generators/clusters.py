"""CDS: one cluster per service (and per subset of one) the node routes to, plus a sidecar's local app cluster."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_pb2
from google.protobuf import duration_pb2

from xdsd.ca import service_id
from xdsd.generators.endpoints import cluster_name, endpoints_for, load_assignment, uses_eds
from xdsd.generators.node import NodeGroup, config_source
from xdsd.generators.tls import upstream_socket
from xdsd.model import Mesh, Service

_LB_POLICIES = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,  # the hash key is on the route (routes.hash_policy)
    "maglev": cluster_pb2.Cluster.MAGLEV,
}


def _seconds(d: duration_pb2.Duration, seconds: float) -> None:
    d.FromNanoseconds(int(round(seconds * 1e9)))


def service_cluster(mesh: Mesh, name: str, group: NodeGroup, own_id: str | None,
                    subset: str | None = None, *, eds: bool) -> cluster_pb2.Cluster:
    """A cluster for service ``name`` (or for one ``subset`` of it, named ``name~subset``). If the
    service runs sidecars and the caller has an identity (``own_id``), traffic goes over mTLS and
    only the service's own SPIFFE ID is accepted. Depends on the service, ``mesh.mesh``, the
    group's transport and zone and ``own_id`` only. ``eds``: the service's one EDS-or-DNS decision
    (``endpoints.uses_eds``, made once per service by the caller)."""
    service = mesh.services[name]
    cluster = cluster_pb2.Cluster(name=cluster_name(name, subset), lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    _seconds(cluster.connect_timeout, service.connect_timeout)
    if eds:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(config_source(group))
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(load_assignment(cluster.name, endpoints_for(mesh, name, subset), group.zone))
    _resilience(cluster, service)
    if service.sidecar is not None and own_id is not None:
        td = mesh.mesh.trust_domain
        cluster.transport_socket.CopyFrom(upstream_socket(group, own_id, td, service_id(td, name)))
    if service.protocol == "http2":
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    return cluster


def _resilience(cluster: cluster_pb2.Cluster, service: Service) -> None:
    """Load balancing, outlier detection, circuit breakers and active health checks."""
    lb = service.load_balancer
    if lb is not None:
        cluster.lb_policy = _LB_POLICIES[lb.policy]
        if lb.panic_threshold is not None:
            cluster.common_lb_config.healthy_panic_threshold.value = lb.panic_threshold
    od = service.outlier_detection
    if od is not None:
        out = cluster.outlier_detection
        out.consecutive_5xx.value = od.consecutive_5xx
        _seconds(out.interval, od.interval)
        _seconds(out.base_ejection_time, od.base_ejection_time)
        out.max_ejection_percent.value = od.max_ejection_percent
    cb = service.circuit_breakers
    if cb is not None:
        t = cluster.circuit_breakers.thresholds.add()  # priority DEFAULT
        for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            value = getattr(cb, field)
            if value is not None:
                getattr(t, field).value = value
        if cb.retry_budget is not None:  # Envoy then ignores max_retries
            t.retry_budget.budget_percent.value = cb.retry_budget.percent
            t.retry_budget.min_retry_concurrency.value = cb.retry_budget.min_concurrency
    hc = service.health_check
    if hc is not None:
        check = cluster.health_checks.add()
        _seconds(check.interval, hc.interval)
        # Envoy checks idle clusters only every 60s by default: use the configured interval.
        _seconds(check.no_traffic_interval, hc.interval)
        _seconds(check.timeout, hc.timeout)
        check.healthy_threshold.value = hc.healthy_threshold
        check.unhealthy_threshold.value = hc.unhealthy_threshold
        check.http_health_check.path = hc.path
        if service.protocol == "http2":
            check.http_health_check.codec_client_type = http_pb2.HTTP2


def local_app_cluster(name: str, address: str, port: int, protocol: str) -> cluster_pb2.Cluster:
    """The app next to the sidecar, in plaintext on the machine itself."""
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.FromSeconds(1)
    lb = cluster.load_assignment.endpoints.add().lb_endpoints.add()
    cluster.load_assignment.cluster_name = name
    sock = lb.endpoint.address.socket_address
    sock.address = "127.0.0.1" if address == "0.0.0.0" else address
    sock.port_value = port
    if protocol == "http2":
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        opts.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    return cluster


def generate(mesh: Mesh, group: NodeGroup, services: list[str], own_id: str | None) -> list[cluster_pb2.Cluster]:
    """The whole-service clusters of ``services`` (subsets not included)."""
    return [service_cluster(mesh, name, group, own_id, eds=uses_eds(mesh.endpoints_of(name))) for name in services]
