"""Prometheus metrics of xdsd itself, fed by the stream observer seam and the controller."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as _Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        self.nacks = Counter("xdsd_nacks", "NACKs received (requests with error_detail)", ["type"], registry=r)
        # Pushes and ACKs (xdsd_pushes, xdsd_push_bytes, xdsd_push_resources, xdsd_acks and the
        # xdsd_push_latency_seconds / xdsd_ack_latency_seconds histograms, by type) are counted in
        # plain numbers and turned into metrics when scraped: a fan-out counts six things per stream.
        self._responses: dict[str, _TypeCounts] = {}
        r.register(_Responses(self._responses))
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

    def _per_type(self, type_url: str) -> _TypeCounts:
        counts = self._responses.get(type_url)
        if counts is None:
            counts = self._responses[type_url] = _TypeCounts()
        return counts

    def response_sent(self, stream: Stream, type_url: str, version: str, size: int, count: int, latency: float) -> None:
        counts = self._per_type(type_url)
        counts.pushes += 1
        counts.push_bytes += size
        counts.push_resources += count
        counts.push_latency.observe(latency)

    def ack(self, stream: Stream, type_url: str, version: str, latency: float | None) -> None:
        counts = self._per_type(type_url)
        counts.acks += 1
        if latency is not None:
            counts.ack_latency.observe(latency)

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


class _Buckets:
    """A latency histogram's counts (``_LATENCY_BUCKETS``, then +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1  # a bucket holds values <= its bound
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), running))
        return out


class _TypeCounts:
    __slots__ = ("pushes", "push_bytes", "push_resources", "acks", "push_latency", "ack_latency")

    def __init__(self) -> None:
        self.pushes = self.push_bytes = self.push_resources = self.acks = 0
        self.push_latency = _Buckets()
        self.ack_latency = _Buckets()


class _Responses(Collector):
    """Pushes and ACKs by type, as counters and latency histograms."""

    def __init__(self, counts: dict[str, _TypeCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        pushes = CounterMetricFamily("xdsd_pushes", "xDS responses sent", labels=["type"])
        push_bytes = CounterMetricFamily("xdsd_push_bytes", "Bytes of xDS responses sent", labels=["type"])
        push_resources = CounterMetricFamily("xdsd_push_resources", "Resources carried by xDS responses",
                                             labels=["type"])
        acks = CounterMetricFamily("xdsd_acks", "ACKs received", labels=["type"])
        push_latency = HistogramMetricFamily(
            "xdsd_push_latency_seconds", "From a snapshot being built to a response carrying it being sent",
            labels=["type"])
        ack_latency = HistogramMetricFamily("xdsd_ack_latency_seconds", "From a response being sent to its ACK",
                                            labels=["type"])
        for type_url, c in sorted(self._counts.items()):
            label = [typeurls.short(type_url)]
            pushes.add_metric(label, c.pushes)
            push_bytes.add_metric(label, c.push_bytes)
            push_resources.add_metric(label, c.push_resources)
            acks.add_metric(label, c.acks)
            push_latency.add_metric(label, c.push_latency.cumulative(), c.push_latency.total)
            ack_latency.add_metric(label, c.ack_latency.cumulative(), c.ack_latency.total)
        yield from (pushes, push_bytes, push_resources, acks, push_latency, ack_latency)
