"""OpenTelemetry spans of the control plane, exported over OTLP/gRPC when configured
(``xdsd serve --otlp-endpoint HOST:PORT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``).

One trace per config revision::

    xdsd.revision            trigger=file|registry|refresh, revision=N, summary
      xdsd.load              read and validate the source (errors: status ERROR, the field paths)
      xdsd.generate          generate and serialize the snapshots of every watched node group
      xdsd.push              first to last xDS response that carried revision N
      xdsd.acks              first response to the last ACK (NACKs are events with the error)

A revision's push spans are written once its responses settle: nothing is waiting for an ACK and
nothing was sent for a short quiet period (or a time limit passed: then ``xdsd.unacked`` > 0).
Timings are recorded as they happen and the spans are emitted afterwards with those times, so a
reload that changes nothing costs nothing.

And, for the authorization service: one span per decision (``xdsd.authz``), child of the span Envoy
propagates in the Check call's ``traceparent`` metadata.

Nothing here imports OpenTelemetry until tracing is switched on; when it is off, every hook is a
no-op object (``NO_TRACING``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xdsd.server.stream import Stream

log = logging.getLogger(__name__)

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
SETTLE_QUIET = 1.0  # seconds without a response or an ACK before a revision's push spans are written
SETTLE_LIMIT = 30.0  # ... or this long after its first response, whatever is still unacknowledged
_KEEP_REVISIONS = 16


def endpoint_from(option: str | None) -> str | None:
    """The OTLP endpoint: the option, else the standard environment variable, else None (off)."""
    return option or os.environ.get(ENV_ENDPOINT) or None


# -- a revision's timeline, recorded now and emitted later ------------------------------------------


@dataclass
class _Stage:
    name: str
    start: int
    end: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class RevisionTrace:
    """What happened to one candidate revision, as stages with wall-clock times (ns)."""

    def __init__(self, tracing: Tracing, trigger: str, attributes: dict[str, Any]) -> None:
        self._tracing = tracing
        self.trigger = trigger
        self.start = time.time_ns()
        self.attributes = attributes
        self.stages: list[_Stage] = []

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[_Stage]:
        st = _Stage(name, time.time_ns(), attributes=dict(attributes))
        self.stages.append(st)
        try:
            yield st
        except Exception as exc:
            st.error = str(exc) or type(exc).__name__
            raise
        finally:
            st.end = time.time_ns()

    def served(self, revision: int, **attributes: Any) -> None:
        """The revision is live: write its spans; its pushes and ACKs join the same trace."""
        self.attributes.update(attributes)
        self._tracing._emit(self, revision, None)

    def rejected(self, errors: Sequence[object]) -> None:
        self._tracing._emit(self, None, [str(e) for e in errors])


class _NullRevisionTrace:
    trigger = ""

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[None]:
        yield None

    def served(self, revision: int, **attributes: Any) -> None:
        pass

    def rejected(self, errors: Sequence[object]) -> None:
        pass


NULL_REVISION = _NullRevisionTrace()


# -- pushes and ACKs per revision ------------------------------------------------------------------


@dataclass
class _Push:
    revision: int
    first_sent: int
    last_sent: int
    last_ack: int = 0
    responses: int = 0
    acks: int = 0
    nacks: list[tuple[str, str, str]] = field(default_factory=list)  # (node, type, error)
    pending: set[tuple[int, str]] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


class Tracing:
    """Control-plane tracing switched on: a private TracerProvider exporting to ``endpoint``."""

    enabled = True

    def __init__(self, endpoint: str, service_name: str = "xdsd", *, exporter: Any = None,
                 schedule_delay_ms: int = 500) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                # xds-protos carries an older copy of opentelemetry/proto/*; if it was installed after
                # opentelemetry-proto, its files won.
                raise SystemExit(
                    f"xdsd: the OTLP exporter cannot load ({exc}); the opentelemetry/proto files were "
                    "replaced by xds-protos' older copy. Fix: pip install --force-reinstall --no-deps "
                    "opentelemetry-proto") from exc

            insecure = not endpoint.startswith("https://")
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        self.endpoint = endpoint
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms))
        self.tracer = self.provider.get_tracer("xdsd")
        self._revisions: dict[int, Any] = {}  # revision -> its root span's context
        self._pushes: dict[int, _Push] = {}
        self._waiting: dict[tuple[int, str], int] = {}  # (stream, type) -> revision awaiting an ACK

    # -- revisions --------------------------------------------------------------------------

    def revision(self, trigger: str, **attributes: Any) -> RevisionTrace:
        return RevisionTrace(self, trigger, attributes)

    def _emit(self, trace: RevisionTrace, revision: int | None, errors: list[str] | None) -> None:
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        end = max([trace.start, *(s.end for s in trace.stages)])
        root = self.tracer.start_span("xdsd.revision", start_time=trace.start,
                                      attributes={"xdsd.trigger": trace.trigger, **_attrs(trace.attributes)})
        if revision is not None:
            root.set_attribute("xdsd.revision", revision)
        if errors:
            root.set_attribute("xdsd.errors", errors)
            root.set_status(Status(StatusCode.ERROR, f"rejected: {len(errors)} errors"))
        ctx = set_span_in_context(root)
        for st in trace.stages:
            span = self.tracer.start_span(st.name, context=ctx, start_time=st.start, attributes=_attrs(st.attributes))
            if st.error is not None:
                span.set_status(Status(StatusCode.ERROR, st.error))
            elif errors and st is trace.stages[-1]:
                span.set_status(Status(StatusCode.ERROR, "; ".join(errors[:5])))
            span.end(end_time=st.end or end)
        root.end(end_time=end)
        if revision is not None:
            self._revisions[revision] = ctx
            for old in sorted(self._revisions)[:-_KEEP_REVISIONS]:
                del self._revisions[old]

    # -- StreamObserver ---------------------------------------------------------------------

    def stream_opened(self, stream: Stream) -> None:
        pass

    def stream_closed(self, stream: Stream) -> None:
        for key in [k for k in self._waiting if k[0] == id(stream)]:
            revision = self._waiting.pop(key)
            push = self._pushes.get(revision)
            if push is not None:
                push.pending.discard(key)
                self._maybe_settle(push)

    def stream_refused(self, reason: str, peer: str) -> None:
        pass

    def response_sent(self, stream: Stream, type_url: str, version: str, size: int, count: int, latency: float) -> None:
        snapshot = stream.snapshot
        if snapshot is None or snapshot.revision not in self._revisions:
            return
        now = time.time_ns()
        push = self._pushes.get(snapshot.revision)
        if push is None:
            push = self._pushes[snapshot.revision] = _Push(snapshot.revision, now, now)
        push.last_sent = now
        push.responses += 1
        push.nodes.add(stream.node_id)
        key = (id(stream), type_url)
        earlier = self._waiting.get(key)
        if earlier is not None and earlier != push.revision and earlier in self._pushes:
            self._pushes[earlier].pending.discard(key)  # superseded before its ACK
            self._maybe_settle(self._pushes[earlier])
        self._waiting[key] = push.revision
        push.pending.add(key)
        self._maybe_settle(push)

    def _acked(self, stream: Stream, type_url: str) -> _Push | None:
        revision = self._waiting.pop((id(stream), type_url), None)
        push = self._pushes.get(revision) if revision is not None else None
        if push is not None:
            push.pending.discard((id(stream), type_url))
            push.last_ack = time.time_ns()
        return push

    def ack(self, stream: Stream, type_url: str, version: str, latency: float | None) -> None:
        push = self._acked(stream, type_url)
        if push is not None:
            push.acks += 1
            self._maybe_settle(push)

    def nack(self, stream: Stream, type_url: str, version: str, error: str) -> None:
        push = self._acked(stream, type_url)
        if push is not None:
            from xdsd import typeurls

            push.nacks.append((stream.node_id, typeurls.short(type_url), error))
            self._maybe_settle(push)

    def _maybe_settle(self, push: _Push) -> None:
        """Write the push spans after a quiet period with nothing pending, or at the time limit."""
        if push.timer is not None:
            push.timer.cancel()
            push.timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside the server (tests): flush() writes them
        age = (time.time_ns() - push.first_sent) / 1e9
        delay = SETTLE_QUIET if not push.pending else max(0.0, SETTLE_LIMIT - age)
        push.timer = loop.call_later(delay, self._settle, push.revision)

    def _settle(self, revision: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        push = self._pushes.pop(revision, None)
        ctx = self._revisions.get(revision)
        if push is None or ctx is None:
            return
        if push.timer is not None:
            push.timer.cancel()
        for key in push.pending:
            self._waiting.pop(key, None)
        common = {"xdsd.revision": revision, "xdsd.proxies": len(push.nodes)}
        self.tracer.start_span("xdsd.push", context=ctx, start_time=push.first_sent,
                               attributes={**common, "xdsd.responses": push.responses}).end(end_time=push.last_sent)
        acks = self.tracer.start_span("xdsd.acks", context=ctx, start_time=push.first_sent, attributes={
            **common, "xdsd.acks": push.acks, "xdsd.nacks": len(push.nacks), "xdsd.unacked": len(push.pending)})
        for node, type_short, error in push.nacks[:100]:
            acks.add_event("nack", {"xdsd.node": node, "xdsd.type": type_short, "xdsd.error": error[:1000]})
        if push.nacks or push.pending:
            acks.set_status(Status(StatusCode.ERROR, f"{len(push.nacks)} NACKs, {len(push.pending)} unacknowledged"))
        acks.end(end_time=max(push.last_ack, push.last_sent))

    def flush(self) -> None:
        """Write every open revision's push spans now, and export what is buffered."""
        for revision in list(self._pushes):
            self._settle(revision)
        self.provider.force_flush(5000)

    def shutdown(self) -> None:
        self.flush()
        self.provider.shutdown()

    # -- authorization ----------------------------------------------------------------------

    def authz_span(self, metadata: Sequence[tuple[str, Any]] | None) -> Any:
        """A span for one authorization decision, child of the caller's ``traceparent`` (if any).
        The caller sets attributes and ends it."""
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate")}
        ctx = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        return self.tracer.start_span("xdsd.authz", context=ctx, kind=SpanKind.SERVER)

    def processing_span(self, metadata: Sequence[tuple[str, Any]] | None) -> Any:
        """A span for one processed phase (ext_proc), child of the caller's ``traceparent`` (if any)."""
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate")}
        ctx = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        return self.tracer.start_span("xdsd.processing", context=ctx, kind=SpanKind.SERVER)


class _NoTracing:
    """Tracing switched off: every hook does nothing."""

    enabled = False

    def revision(self, trigger: str, **attributes: Any) -> _NullRevisionTrace:
        return NULL_REVISION

    def flush(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


NO_TRACING = _NoTracing()


def _attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k if k.startswith("xdsd.") else f"xdsd.{k}": v for k, v in attributes.items() if v is not None}


AnyTracing = Tracing | _NoTracing
AnyRevisionTrace = RevisionTrace | _NullRevisionTrace


def make_tracing(endpoint: str | None, service_name: str = "xdsd") -> AnyTracing:
    return Tracing(endpoint, service_name) if endpoint else NO_TRACING
