"""Envoy's external authorization service (``envoy.service.auth.v3.Authorization/Check``).

It decides from the same mesh revision that drives xDS. It answers every request with a decision:
OK, or PERMISSION_DENIED / UNAUTHENTICATED with an HTTP 403 / 401 and a short body. It never
answers with a gRPC error, which Envoy (fail closed) would turn into a denial without a reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2

from xdsd.auth.access import Access, Denied, token_from_metadata
from xdsd.authz.contract import (
    DECISION_HEADER,
    DRY_RUN_HEADER,
    JWT_METADATA_NAMESPACE,
    JWT_PAYLOAD_KEY,
    SERVICE_KEY,
)
from xdsd.authz.policy import NO_POLICY, Claims, CompiledPolicy, Decision, compile_mesh
from xdsd.model import Mesh

log = logging.getLogger(__name__)


# (service, rule, outcome, seconds) — metrics attach here; this module does not import them.
DecisionObserver = Callable[[str, str, str, float], None]
# Opens a span for one decision from the call's metadata (traceparent); None: tracing is off.
SpanFactory = Callable[[Any], Any]


class _NoClaims:
    """The check's transport cannot carry Envoy's dynamic metadata (HTTP)."""


NO_METADATA = _NoClaims()


def jwt_payload(attrs: external_auth_pb2.AttributeContext) -> dict[str, Any] | None:
    """The payload of the JWT Envoy's jwt_authn filter verified for this request, from the
    dynamic metadata ext_authz passes on (``metadata_context``), or None."""
    ns = attrs.metadata_context.filter_metadata.get(JWT_METADATA_NAMESPACE)
    if ns is None or JWT_PAYLOAD_KEY not in ns.fields:
        return None
    value = ns.fields[JWT_PAYLOAD_KEY]
    if value.WhichOneof("kind") != "struct_value":
        return None
    return json_format.MessageToDict(value.struct_value)


def _service_of(attrs: external_auth_pb2.AttributeContext) -> str:
    service = attrs.context_extensions.get(SERVICE_KEY, "")
    if service:
        return service
    principal = attrs.destination.principal  # our own SVID: spiffe://td/service/<name>
    return principal.rsplit("/service/", 1)[-1] if "/service/" in principal else ""


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, observer: DecisionObserver | None = None, span: SpanFactory | None = None,
                 access: Access | None = None) -> None:
        # Who may ask: a node of the destination service (a sidecar asks about its own service, a
        # gateway about itself), by the node token its bootstrap adds to every check. None: anyone.
        self.access = access
        self._policies: dict[str, CompiledPolicy] = {}
        self._known: frozenset[str] = frozenset()  # services and gateways: metric labels
        self._observer = observer
        self._span = span

    def set_mesh(self, mesh: Mesh) -> None:
        self._policies = compile_mesh(mesh)  # swapped whole: a Check sees one revision
        self._known = frozenset(mesh.services) | frozenset(mesh.gateways)

    def evaluate(self, service: str, principal: str, method: str, path: str, headers: Mapping[str, str],
                 claims: Claims | _NoClaims = None) -> Decision:
        """The decision for one request; ``path`` is already normalized by Envoy's HTTP connection manager.
        ``claims``: the verified JWT payload from Envoy's dynamic metadata (None: no token);
        ``NO_METADATA`` from a transport that cannot carry it (HTTP checks), where a policy that
        matches on end users fails closed."""
        policy = self._policies.get(service)
        if policy is None:
            return NO_POLICY
        if isinstance(claims, _NoClaims):
            if policy.uses_request_auth:
                return Decision(False, "error")
            claims = None
        decision = policy.evaluate(principal, method.upper(), path.split("?", 1)[0], headers, claims)
        if policy.edge and not decision.allowed:
            # A gateway's caller has no mesh identity: 403, unless the policy asks for end users and
            # the request carried no verified token (401: authenticate and try again).
            anonymous = policy.uses_request_auth and not claims
            decision = Decision(False, decision.rule, decision.dry_run, forbidden=not anonymous)
        return decision

    def decide(self, request: external_auth_pb2.CheckRequest) -> tuple[str, Decision]:
        attrs = request.attributes
        http = attrs.request.http
        service = _service_of(attrs)
        return service, self.evaluate(service, attrs.source.principal, http.method, http.path, http.headers,
                                      jwt_payload(attrs))

    def record(self, service: str, decision: Decision, principal: str, method: str, path: str,
               metadata: Any, start: float, elapsed: float) -> None:
        """Metrics, the decision's span and the dry-run log line: the same for both transports."""
        if self._span is not None:
            self._trace(metadata, service, decision, principal, method, path, elapsed)
        if self._observer is not None:
            # Label by mesh names only: a caller must not be able to mint metric series (any string
            # can arrive as a destination).
            label = service if service in self._known else "-"
            self._observer(label, decision.rule, "allow" if decision.allowed else "deny", elapsed)
            for rule, would_allow in decision.dry_run:
                self._observer(label, rule, "dry-run-allow" if would_allow else "dry-run-deny", 0.0)
        if decision.dry_run:
            log.info("authz dry-run for %s from %s: %s", service, principal or "-", dry_run_text(decision))

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        if self.access is not None and self.access.required:
            try:
                self.access.service(token_from_metadata(context.invocation_metadata()), _service_of(request.attributes))
            except Denied as exc:
                # Not a decision: the caller is not a node of the mesh (Envoy fails closed on this).
                code = grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
                await context.abort(code, f"xdsd: {exc}")
        try:
            service, decision = self.decide(request)
        except Exception:  # never let a bad request become a gRPC error (Envoy would fail closed silently)
            log.exception("authorization check failed; denying")
            service, decision = "", Decision(False, "error")
        principal = request.attributes.source.principal
        response = self._response(decision, principal)
        elapsed = time.perf_counter() - start
        if self._span is not None or self._observer is not None or decision.dry_run:
            http = request.attributes.request.http
            metadata = context.invocation_metadata() if self._span is not None else None
            self.record(service, decision, principal, http.method, http.path, metadata, start, elapsed)
        return response

    def _trace(self, metadata: Any, service: str, decision: Decision, principal: str, method: str, path: str,
               elapsed: float) -> None:
        """One span per decision, child of the span Envoy propagated with the check."""
        assert self._span is not None
        try:
            span = self._span(metadata)
            span.set_attributes({
                "xdsd.authz.service": service or "-", "xdsd.authz.rule": decision.rule,
                "xdsd.authz.outcome": "allow" if decision.allowed else "deny",
                "xdsd.authz.principal": principal or "-",
                "http.request.method": method, "url.path": path.split("?", 1)[0],
                "xdsd.authz.seconds": elapsed,
            })
            span.end()
        except Exception:  # tracing must never change a decision
            log.debug("authz span failed", exc_info=True)

    @staticmethod
    def _response(decision: Decision, principal: str) -> external_auth_pb2.CheckResponse:
        dry = dry_run_text(decision)
        if decision.allowed:
            ok = external_auth_pb2.OkHttpResponse()
            if dry:
                ok.response_headers_to_add.add().header.CopyFrom(base_pb2.HeaderValue(key=DRY_RUN_HEADER, value=dry))
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
        unauthenticated = is_unauthenticated(decision, principal)
        code = code_pb2.UNAUTHENTICATED if unauthenticated else code_pb2.PERMISSION_DENIED
        http_code = http_status_pb2.Unauthorized if unauthenticated else http_status_pb2.Forbidden
        denied = external_auth_pb2.DeniedHttpResponse(status=http_status_pb2.HttpStatus(code=http_code),
                                                      body=denial_body(decision))
        denied.headers.add().header.CopyFrom(base_pb2.HeaderValue(key=DECISION_HEADER, value=denial_header(decision)))
        if dry:
            denied.headers.add().header.CopyFrom(base_pb2.HeaderValue(key=DRY_RUN_HEADER, value=dry))
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code), denied_response=denied)


def dry_run_text(decision: Decision) -> str:
    """The dry-run report header: ``rule=allow,rule=deny`` for each matching dry-run rule."""
    return ",".join(f"{r}={'allow' if a else 'deny'}" for r, a in decision.dry_run)


def is_unauthenticated(decision: Decision, principal: str) -> bool:
    """A denial for a caller without a principal is 401 (no identity), except at gateways and on errors."""
    return not principal and decision.rule != "error" and not decision.forbidden


def denial_body(decision: Decision) -> str:
    return f"access denied by xdsd authorization (rule {decision.rule})\n"


def denial_header(decision: Decision) -> str:
    return f"deny; rule={decision.rule}"
