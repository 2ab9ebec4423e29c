"""What the generated Envoy config and xdsd's authorization servers agree on: where the destination
service travels, which headers carry the caller and the decision. No imports: the generators (which
write the filter config) and the servers (which read the checks) both depend on this alone."""

from __future__ import annotations

# gRPC checks: the per-route context extension naming the destination service.
SERVICE_KEY = "xdsd.service"
# HTTP checks: ``http_service.path_prefix`` is PATH_PREFIX + <service> + "/"; Envoy appends the request's path.
PATH_PREFIX = "/_xdsd/authz/"
# The caller's identity on HTTP checks (set by the inbound listener from the verified peer certificate).
XFCC = "x-forwarded-client-cert"
# On a denial: ``deny; rule=<name>``. On any answer with dry-run matches: ``rule=allow,rule=deny``.
DECISION_HEADER = "x-xdsd-authz"
DRY_RUN_HEADER = "x-xdsd-authz-dry-run"
# A verified JWT's payload: Envoy's jwt_authn filter writes it to this dynamic metadata namespace
# under this key (``payload_in_metadata``), and ext_authz passes that namespace to gRPC checks
# (``metadata_context_namespaces``). Never a request header: a client could send one.
JWT_METADATA_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "xdsd_jwt_payload"


def path_prefix(service: str) -> str:
    """The ``http_service.path_prefix`` that names the destination service of a listener's checks.
    It ends in a slash, so the service name ends where the request's path begins whatever that path
    looks like (``*`` for ``OPTIONS *`` has no leading slash)."""
    return f"{PATH_PREFIX}{service}/"
