"""One processed phase: the processor's view of it, the call, Envoy's answer. Runs in a worker
(a thread of xdsd, or a worker process: ``remote_phase`` takes and returns plain data)."""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format

from xdsd.authz.contract import XFCC
from xdsd.authz.http import principal_from_xfcc
from xdsd.processing.api import Continue, Headers, Message, Mutate, Phase, ReplaceBody, Respond
from xdsd.processing.loader import build

# Where Envoy's jwt_authn filter puts verified claims (forwarded by the generated filter config).
CLAIMS_NAMESPACE = "envoy.filters.http.jwt_authn"

_HTTP_STATUSES = frozenset(http_status_pb2.StatusCode.values())


class ProcessorTimeout(BaseException):
    """Raised inside a processor whose call timed out (a BaseException, so that a processor's
    ``except Exception`` does not swallow it)."""


@dataclass(frozen=True, slots=True)
class StepSpec:
    """What a worker needs to run a step (plain, picklable data)."""

    key: str
    processor: str
    args: Mapping[str, Any]
    identity: bool  # callers' XFCC is set by Envoy from a verified certificate (sidecar inbound)
    buffered: bool


@dataclass(slots=True)
class StreamState:
    """What one request's stream has seen so far."""

    request: Headers = field(default_factory=Headers)
    response: Headers = field(default_factory=Headers)
    caller: str | None = None
    claims: Mapping[str, Any] | None = None
# -- one phase -------------------------------------------------------------------------------------


def _headers(message: ep.HttpHeaders) -> Headers:
    return Headers([(h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
                    for h in message.headers.headers])


def process(run: Callable[[Message], Any], spec: StepSpec, stream: StreamState, phase: Phase,
            request: ep.ProcessingRequest) -> ep.ProcessingResponse:
    """Build the processor's view of the phase (updating ``stream``), run it, turn its answer into
    Envoy's."""
    body: bytes | None = None
    end = False
    if phase == "request_headers":
        stream.request = headers = _headers(request.request_headers)
        end = request.request_headers.end_of_stream
        if spec.identity:
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
                      caller=stream.caller, claims=stream.claims, args=spec.args, processor=spec.processor)
    result = run(message)
    return answer(phase, result, spec.buffered)


# -- in a worker process ----------------------------------------------------------------------------

_BUILT: dict[str, Callable[[Message], Any]] = {}  # step key -> its processor, built once per process


def _alarm(signum: int, frame: Any) -> None:
    raise ProcessorTimeout


def init_worker() -> None:
    """A worker process: SIGALRM ends a processor's call at its deadline; SIGINT is the parent's."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def remote_phase(spec: StepSpec, stream: StreamState, phase: Phase, request: bytes,
                 deadline: float) -> tuple[str, Any, Any]:
    """``process`` in a worker process, by the wall clock ``deadline``: ("ok", response bytes,
    stream), ("timeout", None, None) or ("error", text, traceback)."""
    remaining = deadline - time.time()
    if remaining <= 0:  # queued past its deadline: the caller has answered already
        return "timeout", None, None
    try:
        signal.setitimer(signal.ITIMER_REAL, remaining)
        try:
            run = _BUILT.get(spec.key)
            if run is None:
                run = _BUILT[spec.key] = build(spec.processor, spec.args)
            response = process(run, spec, stream, phase, ep.ProcessingRequest.FromString(request))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "ok", response.SerializeToString(), stream
    except ProcessorTimeout:
        return "timeout", None, None
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}", traceback.format_exc()


def answer(phase: str, result: object, buffered: bool) -> ep.ProcessingResponse:
    if result is None or isinstance(result, Continue):
        return continue_(phase)
    if isinstance(result, Respond):
        return immediate(result)
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


def continue_(phase: str) -> ep.ProcessingResponse:
    response = ep.ProcessingResponse()
    getattr(response, phase).SetInParent()
    return response


def immediate(result: Respond) -> ep.ProcessingResponse:
    if result.status not in _HTTP_STATUSES or not 200 <= result.status <= 599:
        raise ValueError(f"Respond status {result.status} is not an HTTP status Envoy can send")
    response = ep.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = result.status  # type: ignore[assignment]
    immediate.body = result.body.encode() if isinstance(result.body, str) else bytes(result.body)
    for name, value in result.headers.items():
        _set(immediate.headers, name, value)
    return response
