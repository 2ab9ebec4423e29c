"""The mesh config as typed, frozen pydantic models. Field-level rules live in ``fields``;
rules that span several fields (references, duplicates) live in ``crosscheck``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StrictStr

from xdsd.model.authentication import Authentication, ClaimName, ClaimValue, Login
from xdsd.model.base import FrozenModel as _Model
from xdsd.model.fields import Host, IPAddress, Name, Port, PositiveDuration, Text, TrustDomain, Weight
from xdsd.model.processing import Processing
from xdsd.model.telemetry import Telemetry
from xdsd.model.traffic import (
    Backoff,
    CircuitBreakers,
    HealthCheck,
    LoadBalancer,
    OutlierDetection,
    Retries,
    RetryOn,
    Route,
    Subset,
)

__all__ = ["Backoff", "CircuitBreakers", "HealthCheck", "LoadBalancer", "OutlierDetection", "Retries", "RetryOn", "Route"]


class Endpoint(_Model):
    """One instance of a service: where its traffic goes."""

    address: Host
    port: Port
    weight: Weight = 1
    zone: Text | None = None
    labels: dict[Text, Text] = Field(default_factory=dict)
    # draining: no new requests (in-flight ones finish); registered instances drain on deregister.
    status: Literal["healthy", "draining"] = "healthy"


class Inbound(_Model):
    """Where the sidecar accepts mesh traffic (mTLS): the instance's mesh address and port."""

    address: IPAddress = "0.0.0.0"
    port: Port


class Sidecar(_Model):
    """An Envoy next to each instance of the service: inbound mTLS to the app, outbound to upstreams."""

    inbound: Inbound
    app_port: Port
    app_address: IPAddress = "127.0.0.1"
    # upstream service -> local port: the app calls http://127.0.0.1:<port> to reach that service
    upstreams: dict[Name, Port] = Field(default_factory=dict)


class Service(_Model):
    endpoints: list[Endpoint] = Field(default_factory=list)
    # Applied to every route to this service (gateway routes and sidecar outbound routes).
    retries: Retries | None = None
    timeout: PositiveDuration | None = None  # whole request, all attempts included
    sidecar: Sidecar | None = None
    # HTTP protocol spoken by the service's instances.
    protocol: Literal["http1", "http2"] = "http1"
    connect_timeout: PositiveDuration = 1.0
    # Named groups of endpoints selected by labels (``v2: {version: v2}``); each is its own cluster.
    subsets: dict[Name, Subset] = Field(default_factory=dict)
    # What sidecars calling this service do with its traffic (matched in order; anything that
    # matches none goes to the whole service). Targets are this service's subsets.
    routes: list[Route] = Field(default_factory=list)
    load_balancer: LoadBalancer | None = None
    outlier_detection: OutlierDetection | None = None
    circuit_breakers: CircuitBreakers | None = None
    health_check: HealthCheck | None = None
    # ext_proc on the inbound side of the service's sidecars (xdsd runs the processor).
    processing: Processing | None = None


class Listen(_Model):
    address: IPAddress
    port: Port


class GatewayRoute(Route):
    """A gateway route: a match (prefix, exact path or regex; methods; headers) and a target
    (a service, a subset of one, or a weighted split), with per-route policy (see ``Route``).
    ``login``: browsers must log in with an OIDC issuer first (``model.authentication``)."""

    login: Login | None = None

    # ext_proc for this route's requests (xdsd runs the processor).
    processing: Processing | None = None


class Gateway(_Model):
    """An edge Envoy: an Envoy whose ``node.cluster`` is the gateway's name."""

    listen: Listen
    routes: list[GatewayRoute] = Field(default_factory=list)


def _canary_share(value: object) -> float:
    """``10%`` or ``10``: the share of each node group's proxies that get a new revision first."""
    if isinstance(value, str) and value.endswith("%"):
        value = value[:-1]
        try:
            value = float(value) if value.strip() == value and value else value
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a percentage such as 10%, got {value!r}")
    if not 0 < value <= 100:
        raise ValueError(f"must be more than 0% and at most 100%, got {value}")
    return float(value)


class Rollout(_Model):
    """Staged rollout of file revisions: a deterministic share of each node group's proxies (by hash
    of node id; at least one per group) gets a new revision first; if any of them NACKs it within
    ``wait``, they get the previous revision back and the others never see the new one."""

    canary: Annotated[float, BeforeValidator(_canary_share)] = 10.0
    wait: PositiveDuration = 10.0


class MeshSettings(_Model):
    trust_domain: TrustDomain = "mesh.local"
    # Lifetime of the X.509 SVIDs the built-in CA issues; each is rotated at half its life.
    cert_lifetime: PositiveDuration = 3600.0
    # Absent: every proxy gets a new file revision at once.
    rollout: Rollout | None = None


class Mesh(_Model):
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    services: dict[Name, Service] = Field(default_factory=dict)
    gateways: dict[Name, Gateway] = Field(default_factory=dict)
    # Per destination service: who may call it, with which methods and paths (ext_authz).
    authorization: dict[Name, Policy] = Field(default_factory=dict)
    # End users: JWT issuers, where a token is required (model.authentication).
    authentication: Authentication = Field(default_factory=Authentication)
    # Stats listener, access logs and tracing pushed to every sidecar and gateway (model.telemetry).
    telemetry: Telemetry = Field(default_factory=Telemetry)

    def endpoints_of(self, name: str) -> list[Endpoint]:
        """A service's endpoints; a service with a sidecar on a fixed inbound address and no listed
        endpoints has exactly that one (the instance's inbound address)."""
        service = self.services[name]
        if service.endpoints or service.sidecar is None or service.sidecar.inbound.address in ("0.0.0.0", "::"):
            return list(service.endpoints)
        return [Endpoint(address=service.sidecar.inbound.address, port=service.sidecar.inbound.port)]

    def summary(self) -> str:
        endpoints = sum(len(self.endpoints_of(n)) for n in self.services)
        routes = sum(len(g.routes) for g in self.gateways.values())
        return (
            f"{len(self.services)} services, {endpoints} endpoints, "
            f"{len(self.gateways)} gateways, {routes} routes"
        )


# Headers that Envoy does not hand to the authorization service as the client sent them, so a rule
# on them would decide differently over gRPC and over HTTP (or match what Envoy added itself).
_UNMATCHABLE = {
    "host": "use ':authority'",
    "content-length": "Envoy sends checks without the body",
    "transfer-encoding": "a hop-by-hop header", "connection": "a hop-by-hop header", "te": "a hop-by-hop header",
    "upgrade": "a hop-by-hop header", "keep-alive": "a hop-by-hop header", "proxy-connection": "a hop-by-hop header",
    "x-forwarded-client-cert": "use 'from' for the caller's identity",
}
_PSEUDO = {":authority", ":method", ":path"}


def _authz_header_name(value: str) -> str:
    name = value.lower()
    if name in _UNMATCHABLE:
        raise ValueError(f"{value!r} cannot be matched by authorization rules ({_UNMATCHABLE[name]})")
    if name.startswith("x-envoy-"):
        raise ValueError(f"{value!r} cannot be matched by authorization rules (Envoy sets x-envoy-* itself)")
    if name.startswith(":"):
        if name not in _PSEUDO:
            raise ValueError(f"{value!r}: the pseudo-headers rules can match are {', '.join(sorted(_PSEUDO))}")
        return name
    if not name or any(c in name for c in " :\t\r\n\"(),/;<=>?@[\\]{}"):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return name


AuthzHeaderName = Annotated[StrictStr, AfterValidator(_authz_header_name)]


class Match(_Model):
    """What a rule matches; every field left out matches anything. All given fields must match."""

    # Callers: service names (their SPIFFE IDs) or raw principals (``spiffe://...``).
    from_: list[Text] = Field(default_factory=list, alias="from")
    methods: list[Text] = Field(default_factory=list)
    # Exact paths, or prefixes written with a trailing ``*`` (``/reviews/*``); ``*`` alone is any path.
    paths: list[Text] = Field(default_factory=list)
    # Request headers that must be present with exactly these values (names are case-insensitive;
    # ``:authority``, ``:method`` and ``:path`` too; not those Envoy changes on the way, see above).
    headers: dict[AuthzHeaderName, Text] = Field(default_factory=dict)
    # End users (a verified JWT, see ``authentication``): ``<iss>/<sub>`` principals, and claims
    # with the value required (a list: any of them); a list-valued claim matches by any element.
    request_principals: list[Text] = Field(default_factory=list)
    claims: dict[ClaimName, ClaimValue | list[ClaimValue]] = Field(default_factory=dict)

    def uses_request_auth(self) -> bool:
        return bool(self.request_principals or self.claims)


class Rule(_Model):
    name: Name
    allow: Match | None = None
    deny: Match | None = None
    # A dry-run rule is evaluated, logged, counted and reported in a response header, but never
    # changes the decision.
    dry_run: bool = False


class Policy(_Model):
    default: Literal["allow", "deny"] = "deny"
    rules: list[Rule] = Field(default_factory=list)
    # insensitive: for apps that ignore case; rule and request paths are compared lower-cased.
    paths_case: Literal["sensitive", "insensitive"] = "sensitive"


Mesh.model_rebuild()
