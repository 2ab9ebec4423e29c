"""A small OTLP/gRPC trace receiver (``opentelemetry.proto.collector.trace.v1.TraceService/Export``)
that keeps every span it is sent, for tests: Envoy's OpenTelemetry tracer and xdsd's own exporter
both send here.

    with OtlpReceiver() as otlp:          # listens on 127.0.0.1:<free port>; otlp.endpoint
        ...
        spans = otlp.wait_for_spans(lambda spans: ..., "what", timeout=20)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.procs import free_port


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802 - gRPC method name
        spans: list[Span] = []
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(
                        service=service, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), kind=s.kind,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        events=tuple(e.name for e in s.events),
                    ))
        with self.receiver.lock:
            self.receiver.spans.extend(spans)
            self.receiver.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.spans: list[Span] = []
        self.exports = 0
        self.lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        if self._server.add_insecure_port(f"{host}:{self.port}") == 0:
            raise RuntimeError(f"cannot listen on {host}:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def wait_for_spans(self, check: Callable[[list[Span]], Any], what: str, timeout: float = 20.0) -> Any:
        """Polls ``check(spans)`` until it returns something truthy, and returns that."""
        deadline = time.monotonic() + timeout
        result: Any = None
        while time.monotonic() < deadline:
            result = check(self.snapshot())
            if result:
                return result
            time.sleep(0.1)
        spans = self.snapshot()
        summary = ", ".join(sorted({f"{s.service}:{s.name}" for s in spans})) or "none"
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; {len(spans)} spans received ({summary})")
