"""Envoy's external processing service (``envoy.service.ext_proc.v3.ExternalProcessor/Process``).

Envoy opens one bidirectional stream per HTTP request and sends each phase it was configured to
send (request headers, request body, response headers, response body); every message gets exactly
one answer for that phase. Which processing step a stream is for comes in its initial metadata
(``x-xdsd-processing``, written by the generators); only nodes of the step's gateway or service may
run it (their node token, like ext_authz).

The processor runs in a worker thread (``runner``), with the step's timeout. A processor that raises
or times out gets the step's failure mode: ``closed`` answers the client 500 (raised) or 504 (timed
out); ``open`` lets the phase pass untouched. Either way it is logged and counted; the stream is
never ended with a gRPC error for it (Envoy would apply its own failure mode without a reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format

from xdsd.auth.access import Access, Denied, token_from_metadata
from xdsd.authz.contract import XFCC
from xdsd.authz.http import principal_from_xfcc
from xdsd.extproc.runner import Outcome, Runner
from xdsd.model import Mesh
from xdsd.model.processing import PROCESSING_METADATA, Processing, processing_steps
from xdsd.processing.api import Continue, Headers, Message, Mutate, Phase, ReplaceBody, Respond
from xdsd.processing.loader import ProcessorError, build

log = logging.getLogger(__name__)

# (processor, phase, outcome ok | error | timeout, seconds): metrics attach here.
ProcessingObserver = Callable[[str, str, str, float], None]
# Opens a span from the call's metadata (traceparent); None: tracing is off.
SpanFactory = Callable[[Any], Any]

# Where Envoy's jwt_authn filter puts verified claims (forwarded by the generated filter config).
CLAIMS_NAMESPACE = "envoy.filters.http.jwt_authn"
# A processor's failure is logged at most this often (per step); every one is counted.
LOG_INTERVAL = 5.0

_HTTP_STATUSES = frozenset(http_status_pb2.StatusCode.values())


@dataclass(slots=True)
class Step:
    owner: str  # the gateway or service whose nodes may run it
    path: str  # its field path in the mesh
    spec: Processing
    run: Callable[[Message], Any]
    identity: bool  # callers' XFCC is set by Envoy from a verified certificate (sidecar inbound)
    last_log: float = 0.0


@dataclass(slots=True)
class _Stream:
    """What one request's stream has seen so far."""

    request: Headers = field(default_factory=Headers)
    response: Headers = field(default_factory=Headers)
    caller: str | None = None
    claims: Mapping[str, Any] | None = None


class ProcessingServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, runner: Runner | None = None, observer: ProcessingObserver | None = None,
                 span: SpanFactory | None = None, access: Access | None = None) -> None:
        self.runner = runner or Runner()
        self.access = access
        self._observer = observer
        self._span = span
        self._steps: dict[str, Step] = {}
        self._previous: dict[str, Step] = {}  # streams opened under the last revision finish on it

    def set_mesh(self, mesh: Mesh) -> None:
        """Build the mesh's processing steps (each processor once; unchanged steps are kept)."""
        steps: dict[str, Step] = {}
        for owner, path, spec in processing_steps(mesh):
            key = spec.key(path)
            old = self._steps.get(key) or self._previous.get(key)
            if old is not None:
                steps[key] = old
                continue
            try:
                run = build(spec.processor, spec.args)
            except ProcessorError as exc:  # validated already; only a module changed on disk gets here
                log.error("%s: processor %r: %s", path, spec.processor, exc)
                continue
            service = mesh.services.get(owner)
            steps[key] = Step(owner, path, spec, run, identity=service is not None and service.sidecar is not None)
        self._previous, self._steps = self._steps, steps

    def close(self) -> None:
        self.runner.close()

    async def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        metadata = context.invocation_metadata() or ()
        key = next((str(v) for k, v in metadata if k == PROCESSING_METADATA), "")
        step = self._steps.get(key) or self._previous.get(key)
        if step is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"xdsd: no processing step {key[:200]!r} in the mesh")
            return
        if self.access is not None and self.access.required:
            try:
                self.access.service(token_from_metadata(metadata), step.owner)
            except Denied as exc:
                code = grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
                await context.abort(code, f"xdsd: {exc}")
                return
        stream = _Stream()
        async for request in request_iterator:
            yield await self._phase(step, stream, request, metadata)

    async def _phase(self, step: Step, stream: _Stream, request: ep.ProcessingRequest,
                     metadata: Any) -> ep.ProcessingResponse:
        which = request.WhichOneof("request")
        if which not in step.spec.phases:  # trailers, or a phase this step does not process
            return _continue(which or "request_headers")
        phase: Phase = which  # type: ignore[assignment]
        outcome = await self.runner.run(lambda: _process(step, stream, phase, request), step.spec.timeout)
        if outcome.kind == "ok":
            response: ep.ProcessingResponse = outcome.value
        else:
            response = self._failed(step, phase, outcome)
        self._record(step, phase, outcome, metadata)
        return response

    def _failed(self, step: Step, phase: Phase, outcome: Outcome) -> ep.ProcessingResponse:
        now = time.monotonic()
        if now - step.last_log >= LOG_INTERVAL:
            step.last_log = now
            if outcome.kind == "timeout":
                log.warning("%s: processor %r timed out after %.3fs (%s, failure %s)", step.path,
                            step.spec.processor, step.spec.timeout, phase, step.spec.failure)
            else:
                exc = outcome.value
                log.warning("%s: processor %r raised in %s (failure %s): %s: %s", step.path, step.spec.processor,
                            phase, step.spec.failure, type(exc).__name__, exc, exc_info=exc)
        if step.spec.failure == "open":
            return _continue(phase)
        status = 504 if outcome.kind == "timeout" else 500
        what = "timed out" if outcome.kind == "timeout" else "failed"
        return _immediate(Respond(status, f"xdsd: processor {step.spec.processor} {what}\n",
                                  {"content-type": "text/plain", PROCESSING_METADATA: outcome.kind}))

    def _record(self, step: Step, phase: Phase, outcome: Outcome, metadata: Any) -> None:
        if self._observer is not None:
            self._observer(step.spec.processor, phase, outcome.kind, outcome.seconds)
        if self._span is not None:
            try:
                span = self._span(metadata)
                span.set_attributes({"xdsd.processing.processor": step.spec.processor,
                                     "xdsd.processing.step": step.path, "xdsd.processing.phase": phase,
                                     "xdsd.processing.outcome": outcome.kind,
                                     "xdsd.processing.seconds": outcome.seconds})
                span.end()
            except Exception:  # tracing must never change an answer
                log.debug("processing span failed", exc_info=True)


# -- one phase, in a worker thread ---------------------------------------------------------------


def _headers(message: ep.HttpHeaders) -> Headers:
    return Headers([(h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
                    for h in message.headers.headers])


def _process(step: Step, stream: _Stream, phase: Phase, request: ep.ProcessingRequest) -> ep.ProcessingResponse:
    """Build the processor's view of the phase, run it, turn its answer into Envoy's."""
    body: bytes | None = None
    end = False
    if phase == "request_headers":
        stream.request = headers = _headers(request.request_headers)
        end = request.request_headers.end_of_stream
        if step.identity:
            stream.caller = principal_from_xfcc(headers.get(XFCC, "")) or None
        claims = request.metadata_context.filter_metadata.get(CLAIMS_NAMESPACE)
        if claims is not None and claims.fields:
            first = next(iter(claims.fields.values()))
            value = json_format.MessageToDict(first)
            stream.claims = value if isinstance(value, dict) else None
    elif phase == "response_headers":
        stream.response = headers = _headers(request.response_headers)
        end = request.response_headers.end_of_stream
    else:
        part = request.request_body if phase == "request_body" else request.response_body
        body, end = part.body, part.end_of_stream
        headers = stream.request if phase == "request_body" else stream.response
    message = Message(phase=phase, headers=headers, body=body, end_of_stream=end, request=stream.request,
                      caller=stream.caller, claims=stream.claims, args=step.spec.args, processor=step.spec.processor)
    result = step.run(message)
    return _answer(phase, result, step.spec.body_mode == "buffered")


def _answer(phase: str, result: object, buffered: bool) -> ep.ProcessingResponse:
    if result is None or isinstance(result, Continue):
        return _continue(phase)
    if isinstance(result, Respond):
        return _immediate(result)
    response = ep.ProcessingResponse()
    common: ep.CommonResponse = getattr(response, phase).response
    if isinstance(result, Mutate):
        _mutate(common.header_mutation, result)
        if phase.endswith("_body") and not buffered:
            raise TypeError("header changes in a body phase need body: buffered")
        return response
    if isinstance(result, ReplaceBody):
        if not phase.endswith("_body"):
            raise TypeError(f"ReplaceBody in phase {phase}: a body can be replaced in body phases only")
        data = result.body.encode() if isinstance(result.body, str) else bytes(result.body)
        common.body_mutation.body = data
        if result.headers is not None:
            _mutate(common.header_mutation, result.headers)
        if buffered:
            _set(common.header_mutation, "content-length", str(len(data)))
            if result.content_type is not None:
                _set(common.header_mutation, "content-type", result.content_type)
        return response
    raise TypeError(f"a processor returns Continue, Mutate, ReplaceBody, Respond or None, not {type(result).__name__}")


def _check_header(name: str, value: str | None = None) -> None:
    if not name or name != name.lower() or name.startswith(":") or any(c in name for c in " \t\r\n:"):
        raise ValueError(f"{name!r} is not a lower-case header name a processor may change")
    if value is not None and any(c in value for c in "\r\n\x00"):
        raise ValueError(f"the value of {name!r} contains CR, LF or NUL")


def _set(mutation: ep.HeaderMutation, name: str, value: str, append: bool = False) -> None:
    _check_header(name, value)
    option = mutation.set_headers.add()
    option.header.key = name
    option.header.raw_value = value.encode()
    option.append_action = (base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD if append
                            else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def _mutate(mutation: ep.HeaderMutation, change: Mutate) -> None:
    for name, value in change.set.items():
        _set(mutation, name, value)
    for name, value in change.append.items():
        _set(mutation, name, value, append=True)
    for name in change.remove:
        _check_header(name)
        mutation.remove_headers.append(name)


def _continue(phase: str) -> ep.ProcessingResponse:
    response = ep.ProcessingResponse()
    getattr(response, phase).SetInParent()
    return response


def _immediate(result: Respond) -> ep.ProcessingResponse:
    if result.status not in _HTTP_STATUSES or not 200 <= result.status <= 599:
        raise ValueError(f"Respond status {result.status} is not an HTTP status Envoy can send")
    response = ep.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = result.status  # type: ignore[assignment]
    immediate.body = result.body.encode() if isinstance(result.body, str) else bytes(result.body)
    for name, value in result.headers.items():
        _set(immediate.headers, name, value)
    return response
