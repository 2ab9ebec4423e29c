"""Envoy's external authorization service (``envoy.service.auth.v3.Authorization/Check``).

It decides from the same mesh revision that drives xDS. It answers every request with a decision:
OK, or PERMISSION_DENIED / UNAUTHENTICATED with an HTTP 403 / 401 and a short body. It never
answers with a gRPC error, which Envoy (fail closed) would turn into a denial without a reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from xdsd.authz.policy import NO_POLICY, CompiledPolicy, Decision, compile_mesh
from xdsd.model import Mesh

log = logging.getLogger(__name__)

SERVICE_KEY = "xdsd.service"  # context extension naming the destination service
DRY_RUN_HEADER = "x-xdsd-authz-dry-run"
DECISION_HEADER = "x-xdsd-authz"

# (service, rule, outcome, seconds) — metrics attach here; this module does not import them.
DecisionObserver = Callable[[str, str, str, float], None]
# Opens a span for one decision from the call's metadata (traceparent); None: tracing is off.
SpanFactory = Callable[[Any], Any]


def _service_of(attrs: external_auth_pb2.AttributeContext) -> str:
    service = attrs.context_extensions.get(SERVICE_KEY, "")
    if service:
        return service
    principal = attrs.destination.principal  # our own SVID: spiffe://td/service/<name>
    return principal.rsplit("/service/", 1)[-1] if "/service/" in principal else ""


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, observer: DecisionObserver | None = None, span: SpanFactory | None = None) -> None:
        self._policies: dict[str, CompiledPolicy] = {}
        self._observer = observer
        self._span = span

    def set_mesh(self, mesh: Mesh) -> None:
        self._policies = compile_mesh(mesh)  # swapped whole: a Check sees one revision

    def decide(self, request: external_auth_pb2.CheckRequest) -> tuple[str, Decision]:
        attrs = request.attributes
        http = attrs.request.http
        service = _service_of(attrs)
        policy = self._policies.get(service)
        if policy is None:
            return service, NO_POLICY
        path = http.path.split("?", 1)[0]  # already normalized by Envoy's HTTP connection manager
        decision = policy.evaluate(attrs.source.principal, http.method.upper(), path, http.headers)
        if policy.edge and not decision.allowed:
            decision = Decision(False, decision.rule, decision.dry_run, forbidden=True)
        return service, decision

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        try:
            service, decision = self.decide(request)
        except Exception:  # never let a bad request become a gRPC error (Envoy would fail closed silently)
            log.exception("authorization check failed; denying")
            service, decision = "", Decision(False, "error")
        response = self._response(decision, request.attributes.source.principal)
        elapsed = time.perf_counter() - start
        if self._span is not None:
            self._trace(request, context, service, decision, start, elapsed)
        if self._observer is not None:
            self._observer(service or "-", decision.rule, "allow" if decision.allowed else "deny", elapsed)
            for rule, would_allow in decision.dry_run:
                self._observer(service or "-", rule, "dry-run-allow" if would_allow else "dry-run-deny", 0.0)
        if decision.dry_run:
            log.info("authz dry-run for %s from %s: %s", service, request.attributes.source.principal or "-",
                     ", ".join(f"{r}={'allow' if a else 'deny'}" for r, a in decision.dry_run))
        return response

    def _trace(self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext, service: str,
               decision: Decision, start: float, elapsed: float) -> None:
        """One span per decision, child of the span Envoy propagated with the Check call."""
        assert self._span is not None
        try:
            span = self._span(context.invocation_metadata())
            http = request.attributes.request.http
            span.set_attributes({
                "xdsd.authz.service": service or "-", "xdsd.authz.rule": decision.rule,
                "xdsd.authz.outcome": "allow" if decision.allowed else "deny",
                "xdsd.authz.principal": request.attributes.source.principal or "-",
                "http.request.method": http.method, "url.path": http.path.split("?", 1)[0],
                "xdsd.authz.seconds": elapsed,
            })
            span.end()
        except Exception:  # tracing must never change a decision
            log.debug("authz span failed", exc_info=True)

    @staticmethod
    def _response(decision: Decision, principal: str) -> external_auth_pb2.CheckResponse:
        dry = ",".join(f"{r}={'allow' if a else 'deny'}" for r, a in decision.dry_run)
        if decision.allowed:
            ok = external_auth_pb2.OkHttpResponse()
            if dry:
                ok.response_headers_to_add.add().header.CopyFrom(base_pb2.HeaderValue(key=DRY_RUN_HEADER, value=dry))
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
        unauthenticated = not principal and decision.rule != "error" and not decision.forbidden
        code = code_pb2.UNAUTHENTICATED if unauthenticated else code_pb2.PERMISSION_DENIED
        http_code = http_status_pb2.Unauthorized if unauthenticated else http_status_pb2.Forbidden
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_code),
            body=f"access denied by xdsd authorization (rule {decision.rule})\n",
        )
        denied.headers.add().header.CopyFrom(base_pb2.HeaderValue(key=DECISION_HEADER, value=f"deny; rule={decision.rule}"))
        if dry:
            denied.headers.add().header.CopyFrom(base_pb2.HeaderValue(key=DRY_RUN_HEADER, value=dry))
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code), denied_response=denied)
