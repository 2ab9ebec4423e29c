"""Prometheus metrics of xdsd itself, fed by the stream observer seam and the controller."""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from xdsd import typeurls

if TYPE_CHECKING:
    from xdsd.server.stream import Stream

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All of xdsd's metrics in one private registry (no global state, one per process/test)."""

    def __init__(self, role_of: Callable[[str], str] | None = None) -> None:
        """``role_of``: node.cluster -> gateway / sidecar / unknown, against the mesh being served."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected_proxies = Gauge(
            "xdsd_connected_proxies", "Distinct Envoy nodes with at least one open xDS stream", registry=r
        )
        self.connected_streams = Gauge(
            "xdsd_connected_streams", "Open xDS streams", ["protocol", "transport"], registry=r
        )
        self.streams_refused = Counter(
            "xdsd_streams_refused", "xDS streams and calls refused (no valid token, revoked, ...)", ["reason"], registry=r)
        self.task_failures = Counter(
            "xdsd_task_failures", "Failures of background work (file watch, rotation, sweep, ...)", ["task"], registry=r)
        self.pushes = Counter("xdsd_pushes", "xDS responses sent", ["type"], registry=r)
        self.push_bytes = Counter("xdsd_push_bytes", "Bytes of xDS responses sent", ["type"], registry=r)
        self.push_resources = Counter("xdsd_push_resources", "Resources carried by xDS responses", ["type"], registry=r)
        self.acks = Counter("xdsd_acks", "ACKs received", ["type"], registry=r)
        self.nacks = Counter("xdsd_nacks", "NACKs received (requests with error_detail)", ["type"], registry=r)
        self.push_latency = Histogram(
            "xdsd_push_latency_seconds",
            "From a snapshot being built to a response carrying it being sent",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_latency = Histogram(
            "xdsd_ack_latency_seconds",
            "From a response being sent to its ACK",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "xdsd_config_reloads", "Mesh config loads by result", ["result"], registry=r
        )
        self.config_rejections = Counter(
            "xdsd_config_rejections", "Mesh config revisions rejected (invalid); the last good one stays", registry=r
        )
        self.rollouts = Counter(
            "xdsd_rollouts", "Staged rollouts by result (started, promoted, rolled_back, superseded)", ["result"],
            registry=r)
        self.config_held = Counter(
            "xdsd_config_held", "File revisions held because they remove most of the mesh at once", registry=r)
        self.config_revision = Gauge("xdsd_config_revision", "Revision of the mesh being served", registry=r)
        self.config_valid = Gauge(
            "xdsd_config_last_load_valid", "1 if the last load of the mesh config was valid, else 0", registry=r
        )
        self.ready = Gauge("xdsd_ready", "1 once a complete valid config is loaded and served", registry=r)
        self.authz_decisions = Counter(
            "xdsd_authz_decisions", "Authorization decisions", ["service", "rule", "outcome"], registry=r
        )
        self.authz_latency = Histogram(
            "xdsd_authz_decision_seconds",
            "Time to evaluate one authorization request",
            buckets=(0.00001, 0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01),
            registry=r,
        )
        self.loop_stall = Histogram(
            "xdsd_event_loop_stall_seconds",
            "How late the event loop woke a 5 ms timer (anything holding the loop shows up here)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.snapshot_build = Histogram(
            "xdsd_snapshot_build_seconds",
            "Time to generate and serialize the snapshots of every watched node group for one revision",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self._nodes: _Counter[str] = _Counter()
        # node id -> node.cluster; the role (gateway/sidecar/unknown) is decided at scrape time against
        # the mesh being served (``role_of``, wired by the app), so a config change re-labels proxies.
        self._node_cluster: dict[str, str] = {}
        self.role_of: Callable[[str], str] = role_of or (lambda cluster: "unknown")
        r.register(_ProxiesByRole(self))
        self._type_children: dict[str, tuple[Any, ...]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def authz_decision(self, service: str, rule: str, outcome: str, seconds: float) -> None:
        self.authz_decisions.labels(service, rule, outcome).inc()
        if not outcome.startswith("dry-run"):
            self.authz_latency.observe(seconds)

    # -- StreamObserver -------------------------------------------------------------------

    def stream_opened(self, stream: Stream) -> None:
        self.connected_streams.labels("delta" if stream.delta else "sotw", str(stream.transport)).inc()
        self._nodes[stream.node_id] += 1
        self._node_cluster[stream.node_id] = stream.cluster
        self.connected_proxies.set(len(self._nodes))

    def stream_closed(self, stream: Stream) -> None:
        self.connected_streams.labels("delta" if stream.delta else "sotw", str(stream.transport)).dec()
        self._nodes[stream.node_id] -= 1
        if self._nodes[stream.node_id] <= 0:
            del self._nodes[stream.node_id]
            self._node_cluster.pop(stream.node_id, None)
        self.connected_proxies.set(len(self._nodes))

    def stream_refused(self, reason: str, peer: str) -> None:
        self.streams_refused.labels(reason.split(":", 1)[0]).inc()

    def _per_type(self, type_url: str) -> tuple[Any, ...]:
        # Resolved once per type: a fan-out calls these for every stream.
        children = self._type_children.get(type_url)
        if children is None:
            t = typeurls.short(type_url)
            children = (self.pushes.labels(t), self.push_bytes.labels(t), self.push_resources.labels(t),
                        self.push_latency.labels(t), self.acks.labels(t), self.ack_latency.labels(t))
            self._type_children[type_url] = children
        return children

    def response_sent(self, stream: Stream, type_url: str, version: str, size: int, count: int, latency: float) -> None:
        pushes, push_bytes, push_resources, push_latency, _, _ = self._per_type(type_url)
        pushes.inc()
        push_bytes.inc(size)
        push_resources.inc(count)
        push_latency.observe(latency)

    def ack(self, stream: Stream, type_url: str, version: str, latency: float | None) -> None:
        _, _, _, _, acks, ack_latency = self._per_type(type_url)
        acks.inc()
        if latency is not None:
            ack_latency.observe(latency)

    def nack(self, stream: Stream, type_url: str, version: str, error: str) -> None:
        self.nacks.labels(typeurls.short(type_url)).inc()


ROLES = ("gateway", "sidecar", "unknown")


class _ProxiesByRole(Collector):
    """``xdsd_connected_proxies_by_role{role}``: connected proxies by the role their node.cluster has
    in the mesh being served (an Envoy whose cluster is neither a gateway nor a service: unknown)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = _Counter(self._metrics.role_of(c) for c in list(self._metrics._node_cluster.values()))
        family = GaugeMetricFamily("xdsd_connected_proxies_by_role",
                                   "Distinct Envoy nodes with an open xDS stream, by role (gateway, sidecar, unknown)",
                                   labels=["role"])
        for role in sorted({*ROLES, *counts}):
            family.add_metric([role], counts.get(role, 0))
        yield family
