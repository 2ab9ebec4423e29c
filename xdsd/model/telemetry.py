"""The ``telemetry:`` section of the mesh config: what every sidecar and gateway reports, and where.

    telemetry:
      stats: {port: 15090}                      # /stats/prometheus on a listener xdsd pushes
      access_log: {path: /dev/stdout}           # JSON lines, DEFAULT_ACCESS_LOG_FIELDS unless ``fields``
      tracing: {collector: 127.0.0.1:4317, sampling: 100}   # OpenTelemetry (OTLP/gRPC) in every HCM

Each part is off while it is left out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field, StrictStr

from xdsd.errors import FieldError
from xdsd.model.base import FrozenModel as _Model
from xdsd.model.fields import IPAddress, Name, Port, Text, check_host, check_text, safe_repr

if TYPE_CHECKING:
    from xdsd.model.mesh import Mesh

# Access-log fields by name: the JSON key and the Envoy command operator that fills it. ``service``
# and ``direction`` are filled by xdsd (the node's service or gateway name; inbound/outbound/gateway).
ACCESS_LOG_CATALOG: dict[str, str] = {
    "start_time": "%START_TIME%",
    "service": "",
    "direction": "",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_service_time_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_peer_principal": "%DOWNSTREAM_PEER_URI_SAN%",
    "authority": "%REQ(:AUTHORITY)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "traceparent": "%REQ(TRACEPARENT)%",
    "route_name": "%ROUTE_NAME%",
}

DEFAULT_ACCESS_LOG_FIELDS: tuple[str, ...] = (
    "start_time", "service", "direction", "method", "path", "protocol", "response_code", "response_flags",
    "bytes_received", "bytes_sent", "duration_ms", "upstream_service_time_ms", "upstream_cluster",
    "upstream_host", "downstream_remote_address", "downstream_peer_principal", "authority", "user_agent",
    "request_id", "trace_id",
)


# Envoy 1.40's command operators (each tried with `envoy --mode validate`): those that take no
# parameters, those that need them (``%REQ(:PATH)%``) and those that may have them (``%START_TIME(%s)%``).
# Only those in _TRUNCATED may end in ``:N`` (truncate to N characters).
_NO_PARAMETERS = frozenset((
    "ACCESS_LOG_TYPE BYTES_RECEIVED BYTES_RETRANSMITTED BYTES_SENT CONNECTION_ID "
    "CONNECTION_TERMINATION_DETAILS CUSTOM_FLAGS DOWNSTREAM_DETECTED_CLOSE_TYPE "
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS DOWNSTREAM_DIRECT_LOCAL_PORT DOWNSTREAM_DIRECT_REMOTE_ADDRESS "
    "DOWNSTREAM_DIRECT_REMOTE_PORT DOWNSTREAM_HANDSHAKE_DURATION DOWNSTREAM_HEADER_BYTES_RECEIVED "
    "DOWNSTREAM_HEADER_BYTES_SENT DOWNSTREAM_LOCAL_ADDRESS DOWNSTREAM_LOCAL_CLOSE_REASON "
    "DOWNSTREAM_LOCAL_DNS_SAN DOWNSTREAM_LOCAL_EMAIL_SAN DOWNSTREAM_LOCAL_IP_SAN "
    "DOWNSTREAM_LOCAL_OTHERNAME_SAN DOWNSTREAM_LOCAL_PORT DOWNSTREAM_LOCAL_SUBJECT "
    "DOWNSTREAM_LOCAL_URI_SAN DOWNSTREAM_PEER_CERT DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1 "
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256 DOWNSTREAM_PEER_CHAIN_SERIALS DOWNSTREAM_PEER_DNS_SAN "
    "DOWNSTREAM_PEER_EMAIL_SAN DOWNSTREAM_PEER_FINGERPRINT_1 DOWNSTREAM_PEER_FINGERPRINT_256 "
    "DOWNSTREAM_PEER_IP_SAN DOWNSTREAM_PEER_ISSUER DOWNSTREAM_PEER_OTHERNAME_SAN DOWNSTREAM_PEER_SERIAL "
    "DOWNSTREAM_PEER_SUBJECT DOWNSTREAM_PEER_URI_SAN DOWNSTREAM_REMOTE_ADDRESS DOWNSTREAM_REMOTE_PORT "
    "DOWNSTREAM_TLS_CIPHER DOWNSTREAM_TLS_SESSION_ID DOWNSTREAM_TLS_VERSION "
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON DOWNSTREAM_WIRE_BYTES_RECEIVED DOWNSTREAM_WIRE_BYTES_SENT "
    "DURATION FILTER_CHAIN_NAME HOSTNAME LOCAL_REPLY_BODY PACKETS_RETRANSMITTED PATH PROTOCOL "
    "REQUESTED_SERVER_NAME REQUEST_DURATION REQUEST_HEADERS_BYTES REQUEST_TX_DURATION RESPONSE_CODE "
    "RESPONSE_DURATION RESPONSE_FLAGS RESPONSE_FLAGS_LONG RESPONSE_HEADERS_BYTES RESPONSE_TRAILERS_BYTES "
    "RESPONSE_TX_DURATION ROUNDTRIP_DURATION ROUTE_NAME STREAM_ID TRACE_ID UNIQUE_ID UPSTREAM_CLUSTER "
    "UPSTREAM_CLUSTER_RAW UPSTREAM_CONNECTION_ID UPSTREAM_CONNECTION_POOL_READY_DURATION "
    "UPSTREAM_DETECTED_CLOSE_TYPE UPSTREAM_HEADER_BYTES_RECEIVED UPSTREAM_HEADER_BYTES_SENT UPSTREAM_HOST "
    "UPSTREAM_HOST_NAME UPSTREAM_HOST_NAME_WITHOUT_PORT UPSTREAM_LOCAL_ADDRESS "
    "UPSTREAM_LOCAL_CLOSE_REASON UPSTREAM_LOCAL_DNS_SAN UPSTREAM_LOCAL_IP_SAN UPSTREAM_LOCAL_PORT "
    "UPSTREAM_LOCAL_URI_SAN UPSTREAM_PEER_CERT UPSTREAM_PEER_DNS_SAN UPSTREAM_PEER_IP_SAN "
    "UPSTREAM_PEER_ISSUER UPSTREAM_PEER_SUBJECT UPSTREAM_PEER_URI_SAN UPSTREAM_PROTOCOL "
    "UPSTREAM_REMOTE_ADDRESS UPSTREAM_REMOTE_PORT UPSTREAM_REQUEST_ATTEMPT_COUNT UPSTREAM_TLS_CIPHER "
    "UPSTREAM_TLS_SESSION_ID UPSTREAM_TLS_VERSION UPSTREAM_TRANSPORT_FAILURE_REASON "
    "UPSTREAM_WIRE_BYTES_RECEIVED UPSTREAM_WIRE_BYTES_SENT VIRTUAL_CLUSTER_NAME"
).split())
_PARAMETERS_REQUIRED = frozenset((
    "CEL CLUSTER_METADATA DYNAMIC_METADATA ENVIRONMENT FILTER_STATE QUERY_PARAM REQ REQUEST_HEADER RESP "
    "RESPONSE_HEADER RESPONSE_TRAILER TRAILER UPSTREAM_FILTER_STATE UPSTREAM_METADATA"
).split())
_PARAMETERS_OPTIONAL = frozenset((
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT "
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT DOWNSTREAM_PEER_CERT_V_END DOWNSTREAM_PEER_CERT_V_START "
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT EMIT_TIME EMIT_TIME_LOCAL RESPONSE_CODE_DETAILS START_TIME "
    "START_TIME_LOCAL UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT UPSTREAM_PEER_CERT_V_END "
    "UPSTREAM_PEER_CERT_V_START UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
).split())
_TRUNCATED = frozenset((
    "CEL DYNAMIC_METADATA ENVIRONMENT FILTER_STATE PATH QUERY_PARAM REQ REQUEST_HEADER RESP RESPONSE_HEADER "
    "RESPONSE_TRAILER TRAILER UPSTREAM_FILTER_STATE"
).split())
_OPERATOR_RE = re.compile(r"%([A-Z0-9_]+)(\(([^)]*)\))?(:[0-9]{1,9})?%")


def format_problem(value: str) -> str | None:
    """Why Envoy would refuse ``value`` as an access-log format string, or None: text with
    ``%OPERATOR%``, ``%OPERATOR(PARAMETERS)%`` or ``%OPERATOR(PARAMETERS):N%`` commands
    (``%%`` is a percent sign)."""
    if "%" not in value:
        return "give an Envoy command operator such as '%REQ(:PATH)%'"
    i = 0
    while (i := value.find("%", i)) >= 0:
        if value.startswith("%%", i):
            i += 2
            continue
        match = _OPERATOR_RE.match(value, i)
        if match is None:
            return f"no command operator at position {i} (write %% for a percent sign)"
        name, params = match.group(1), match.group(3)
        if name in _PARAMETERS_REQUIRED:
            if not params:
                return f"%{name}% needs parameters, such as %{name}(...)%"
        elif name in _NO_PARAMETERS:
            if match.group(2) is not None:
                return f"%{name}% takes no parameters"
        elif name not in _PARAMETERS_OPTIONAL:
            return f"unknown command operator %{name}%"
        if match.group(4) is not None and name not in _TRUNCATED:
            return f"%{name}% cannot be truncated (:N)"
        i = match.end()
    return None


def _check_sampling(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"must be 0..100, got {value:g}")
    return float(value)


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"must be HOST:PORT, got {safe_repr(value)}")
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port if len(port) <= 10 else port[:10] + '...'}")
    check_host(host)
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {safe_repr(value)}")
    return check_text(value)


def _check_fields(value: list[str] | dict[str, str] | None) -> list[str] | dict[str, str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one field (or leave 'fields' out for the default set)")
    if isinstance(value, list):
        unknown = [f for f in value if f not in ACCESS_LOG_CATALOG]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; known: {', '.join(ACCESS_LOG_CATALOG)} "
                             "(or give a mapping of JSON key to Envoy command operator)")
        if len(set(value)) != len(value):
            raise ValueError("fields are listed more than once")
        return value
    for key, operator in value.items():
        problem = "give an Envoy command operator such as '%REQ(:PATH)%'" if not key else format_problem(operator)
        if problem is not None:
            raise ValueError(f"{safe_repr(key)}: {problem}, got {safe_repr(operator)}")
    return value


HostPort = Annotated[StrictStr, AfterValidator(_check_host_port)]
Percent = Annotated[float, AfterValidator(_check_sampling)]


class StatsOverride(_Model):
    """Where one sidecar service's (or gateway's) stats listener binds instead."""

    address: IPAddress | None = None
    port: Port | None = None


class Stats(_Model):
    """Every sidecar and gateway serves ``GET /stats/prometheus`` on ``<address>:<port>``.

    By default a sidecar's stats listener binds the instance's inbound address (the node's
    ``xdsd.inbound_address``, else ``sidecar.inbound.address``) and a gateway's its listen address, so
    several Envoys on one host (127.0.0.2, 127.0.0.3, ...) share the port without clashing."""

    port: Port = 15090
    address: IPAddress | None = None  # one address for every node instead (e.g. 0.0.0.0)
    overrides: dict[Name, StatsOverride] = Field(default_factory=dict)  # by service or gateway name


class AccessLog(_Model):
    enabled: bool = True
    path: Annotated[StrictStr, AfterValidator(_check_path)] = "/dev/stdout"
    # Names from ACCESS_LOG_CATALOG, or a mapping of JSON key -> Envoy command operator.
    fields: Annotated[list[Text] | dict[Text, Text] | None, AfterValidator(_check_fields)] = None

    def format(self, service: str, direction: str) -> dict[str, str]:
        """The JSON object Envoy writes per request: key -> command operator (or literal)."""
        if isinstance(self.fields, dict):
            return dict(self.fields)
        literals = {"service": service, "direction": direction}
        names = self.fields if self.fields is not None else DEFAULT_ACCESS_LOG_FIELDS
        return {n: literals.get(n, ACCESS_LOG_CATALOG[n]) for n in names}


class Tracing(_Model):
    """OpenTelemetry tracing in every HTTP connection manager; spans go over OTLP/gRPC to ``collector``."""

    collector: HostPort
    sampling: Percent = 100.0  # percent of requests that start a trace (an incoming sampled trace is kept)
    service_name: Text | None = None  # default: the node's service or gateway name

    @property
    def collector_host(self) -> str:
        host = self.collector.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def collector_port(self) -> int:
        return int(self.collector.rpartition(":")[2])


class Telemetry(_Model):
    stats: Stats | None = None
    access_log: AccessLog | None = None
    tracing: Tracing | None = None

    @property
    def enabled(self) -> bool:
        return self.stats is not None or (self.access_log is not None and self.access_log.enabled) \
            or self.tracing is not None


def check_telemetry(mesh: Mesh) -> list[FieldError]:
    """Cross-field rules: overrides name a sidecar service or a gateway; a stats listener does not
    take a port another listener of the same node binds on the same address."""
    stats = mesh.telemetry.stats
    if stats is None:
        return []
    errors: list[FieldError] = []
    for name, override in stats.overrides.items():
        service = mesh.services.get(name)
        if name not in mesh.gateways and (service is None or service.sidecar is None):
            errors.append(FieldError(f"telemetry.stats.overrides.{name}", f"unknown gateway or sidecar service {name!r}"))
            continue
        if override.address is None and override.port is None:
            errors.append(FieldError(f"telemetry.stats.overrides.{name}", "give an address, a port or both"))
    for name, service in mesh.services.items():
        if service.sidecar is None:
            continue
        sc = service.sidecar
        address, port, where = stats_address(mesh, name, sc.inbound.address)
        taken = {sc.inbound.port: f"services.{name}.sidecar.inbound.port"} if _overlap(address, sc.inbound.address) else {}
        if _overlap(address, "127.0.0.1"):
            taken.update({p: f"services.{name}.sidecar.upstreams.{u}" for u, p in sc.upstreams.items()})
        if port in taken:
            errors.append(FieldError(where, f"stats port {port} of {name!r} on {address} is already {taken[port]}"))
    for name, gateway in mesh.gateways.items():
        address, port, where = stats_address(mesh, name, gateway.listen.address)
        if port == gateway.listen.port and _overlap(address, gateway.listen.address):
            errors.append(FieldError(where, f"stats port {port} of {name!r} on {address} is already "
                                            f"gateways.{name}.listen.port"))
    return errors


def stats_address(mesh: Mesh, name: str, own_address: str) -> tuple[str, int, str]:
    """(address, port, config path that decides the port) of ``name``'s stats listener, given the
    node's own address (sidecar inbound address or gateway listen address)."""
    stats = mesh.telemetry.stats
    assert stats is not None
    override = stats.overrides.get(name)
    address = (override.address if override else None) or stats.address or own_address
    if override is not None and override.port is not None:
        return address, override.port, f"telemetry.stats.overrides.{name}.port"
    return address, stats.port, "telemetry.stats.port"


def _overlap(a: str, b: str) -> bool:
    return a == b or a in ("0.0.0.0", "::") or b in ("0.0.0.0", "::")
