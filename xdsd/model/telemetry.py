"""The ``telemetry:`` section of the mesh config: what every sidecar and gateway reports, and where.

    telemetry:
      stats: {port: 15090}                      # /stats/prometheus on a listener xdsd pushes
      access_log: {path: /dev/stdout}           # JSON lines, DEFAULT_ACCESS_LOG_FIELDS unless ``fields``
      tracing: {collector: 127.0.0.1:4317, sampling: 100}   # OpenTelemetry (OTLP/gRPC) in every HCM

Each part is off while it is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field, StrictStr

from xdsd.errors import FieldError
from xdsd.model.base import FrozenModel as _Model
from xdsd.model.fields import IPAddress, Name, Port, check_host

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


def _check_sampling(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"must be 0..100, got {value:g}")
    return float(value)


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    check_host(host)
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


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
        if not key or "%" not in operator:
            raise ValueError(f"{key!r}: give an Envoy command operator such as '%REQ(:PATH)%', got {operator!r}")
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
    fields: Annotated[list[StrictStr] | dict[StrictStr, StrictStr] | None, AfterValidator(_check_fields)] = None

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
    service_name: StrictStr | None = None  # default: the node's service or gateway name

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
