"""Control-plane tracing (observability.tracing) with an in-memory exporter, the authz span hook,
and the proxies-by-role metric."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from xdsd import typeurls
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.errors import FieldError
from xdsd.generators.roles import role_of
from xdsd.model import load_mesh
from xdsd.observability.metrics import Metrics
from xdsd.observability.tracing import NO_TRACING, NULL_REVISION, Tracing, endpoint_from, make_tracing


@pytest.fixture
def traced() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing("unused:4317", exporter=exporter, schedule_delay_ms=10), exporter


def _stream(node: str, revision: int) -> Any:
    return SimpleNamespace(node_id=node, cluster=node.split("-")[0], snapshot=SimpleNamespace(revision=revision))


def _spans(tracing: Tracing, exporter: InMemorySpanExporter) -> dict[str, Any]:
    tracing.flush()
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_served_revision_is_one_trace_from_load_to_acks(traced: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = traced
    trace = tracing.revision("file", source="/etc/mesh.yaml")
    with trace.stage("xdsd.load"):
        pass
    with trace.stage("xdsd.generate"):
        pass
    trace.served(7)
    a, b = _stream("edge-1", 7), _stream("reviews-1", 7)
    tracing.response_sent(a, typeurls.CLUSTER, "v1", 10, 1, 0.001)
    tracing.response_sent(b, typeurls.CLUSTER, "v1", 10, 1, 0.001)
    tracing.ack(a, typeurls.CLUSTER, "v1", 0.002)
    tracing.nack(b, typeurls.CLUSTER, "v1", "bad cluster")
    tracing.response_sent(_stream("old-1", 3), typeurls.CLUSTER, "v0", 10, 1, 0.001)  # unknown revision: ignored
    spans = _spans(tracing, exporter)
    assert set(spans) == {"xdsd.revision", "xdsd.load", "xdsd.generate", "xdsd.push", "xdsd.acks"}
    root = spans["xdsd.revision"]
    assert root.attributes["xdsd.revision"] == 7 and root.attributes["xdsd.trigger"] == "file"
    assert root.attributes["xdsd.source"] == "/etc/mesh.yaml"
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
    assert all(s.parent.span_id == root.context.span_id for n, s in spans.items() if n != "xdsd.revision")
    push, acks = spans["xdsd.push"], spans["xdsd.acks"]
    assert push.attributes["xdsd.responses"] == 2 and push.attributes["xdsd.proxies"] == 2
    assert acks.attributes["xdsd.acks"] == 1 and acks.attributes["xdsd.nacks"] == 1
    assert [e.attributes["xdsd.error"] for e in acks.events] == ["bad cluster"]
    assert not acks.status.is_ok


def test_a_rejected_revision_has_error_status_and_the_field_paths(traced: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = traced
    trace = tracing.revision("file")
    with pytest.raises(ValueError), trace.stage("xdsd.load"):
        raise ValueError("telemetry.tracing.sampling: must be 0..100, got 120")
    trace.rejected([FieldError("telemetry.tracing.sampling", "must be 0..100, got 120")])
    spans = _spans(tracing, exporter)
    assert set(spans) == {"xdsd.revision", "xdsd.load"}
    assert spans["xdsd.revision"].attributes["xdsd.errors"] == ("telemetry.tracing.sampling: must be 0..100, got 120",)
    assert not spans["xdsd.load"].status.is_ok


def test_a_reload_that_changes_nothing_writes_nothing(traced: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = traced
    with tracing.revision("file").stage("xdsd.load"):
        pass  # source.load() returned None: no revision
    assert _spans(tracing, exporter) == {}


def test_push_spans_settle_on_the_event_loop(traced: tuple[Tracing, InMemorySpanExporter],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from xdsd.observability import tracing as mod

    monkeypatch.setattr(mod, "SETTLE_QUIET", 0.01)
    tracing, exporter = traced

    async def run() -> None:
        tracing.revision("registry").served(1)
        s = _stream("edge-1", 1)
        tracing.response_sent(s, typeurls.LISTENER, "v", 1, 1, 0.0)
        await asyncio.sleep(0.05)
        assert not [x for x in exporter.get_finished_spans() if x.name == "xdsd.acks"]  # still waiting for the ACK
        tracing.ack(s, typeurls.LISTENER, "v", 0.01)
        for _ in range(500):  # the settle timer runs on this loop: give it turns, bounded (5 s)
            tracing.provider.force_flush()
            if any(x.name == "xdsd.acks" for x in exporter.get_finished_spans()):
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    tracing.provider.force_flush()
    acks = [x for x in exporter.get_finished_spans() if x.name == "xdsd.acks"]
    assert len(acks) == 1 and acks[0].attributes["xdsd.acks"] == 1 and acks[0].attributes["xdsd.unacked"] == 0


def test_off_is_free_and_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert endpoint_from(None) is None and make_tracing(None) is NO_TRACING
    assert NO_TRACING.revision("file") is NULL_REVISION
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")
    assert endpoint_from(None) == "collector:4317" and endpoint_from("x:1") == "x:1"
    code = "import sys, xdsd.app, xdsd.cli; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


async def test_authz_decision_span_joins_the_callers_trace(traced: tuple[Tracing, InMemorySpanExporter]) -> None:
    from envoy.service.auth.v3 import external_auth_pb2

    tracing, exporter = traced
    servicer = AuthorizationServicer(span=tracing.authz_span)
    servicer.set_mesh(load_mesh("""
services: {reviews: {endpoints: [{address: 10.0.0.1, port: 80}]}}
authorization: {reviews: {default: deny, rules: [{name: get-only, allow: {methods: [GET]}}]}}
"""))
    request = external_auth_pb2.CheckRequest()
    request.attributes.context_extensions["xdsd.service"] = "reviews"
    request.attributes.request.http.method = "POST"
    request.attributes.request.http.path = "/x?y=1"
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = SimpleNamespace(invocation_metadata=lambda: [("traceparent", parent), ("x-other", "1")])
    response = await servicer.Check(request, context)  # type: ignore[arg-type]
    assert response.status.code != 0
    tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "xdsd.authz"
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes["xdsd.authz.outcome"] == "deny" and span.attributes["url.path"] == "/x"


def test_proxies_by_role_follow_the_mesh_being_served() -> None:
    metrics = Metrics()
    mesh = {"m": load_mesh("""
services: {reviews: {endpoints: [{address: 10.0.0.1, port: 80}]}}
gateways: {edge: {listen: {address: 127.0.0.1, port: 10000}, routes: [{prefix: /, service: reviews}]}}
""")}
    metrics.role_of = lambda cluster: role_of(mesh["m"], cluster)
    streams = [SimpleNamespace(node_id=n, cluster=c, delta=False, transport="ads")
               for n, c in [("edge-1", "edge"), ("edge-2", "edge"), ("reviews-1", "reviews"), ("x-1", "nobody")]]
    for s in streams:
        metrics.stream_opened(s)  # type: ignore[arg-type]
    metrics.stream_opened(streams[0])  # a second stream of the same node counts once

    def by_role() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        return {s.labels["role"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
                for s in f.samples if s.name == "xdsd_connected_proxies_by_role"}

    assert by_role() == {"gateway": 2, "sidecar": 1, "unknown": 1}
    for s in streams[:2]:
        metrics.stream_closed(s)  # type: ignore[arg-type]
    assert by_role() == {"gateway": 1, "sidecar": 1, "unknown": 1}
    mesh["m"] = load_mesh("services: {edge: {endpoints: [{address: 10.0.0.1, port: 80}]}}")
    assert by_role() == {"gateway": 0, "sidecar": 1, "unknown": 2}
