"""Traffic policy: how requests are matched, split, retried, faulted, balanced and failed over.

Route-level policy (``Route``) is used by gateway routes and by a service's own ``routes`` (what
sidecars calling the service apply). Upstream policy (``LoadBalancer``, ``OutlierDetection``,
``CircuitBreakers``, ``HealthCheck``) lives on the service and becomes part of its clusters.
Rules spanning fields (weights adding up, known subsets) are checked in ``crosscheck``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictFloat, StrictInt, StrictStr

from xdsd.model.base import FrozenModel
from xdsd.model.fields import Host, Name, PathPrefix, PositiveDuration, Text, check_text, safe_repr


def _between(lo: int, hi: int) -> AfterValidator:
    def check(value: float) -> float:
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi}, got {value}")
        return value

    return AfterValidator(check)


# 0..100, fractions allowed (0.5 = one request in 200); Envoy gets them per million.
Percent = Annotated[StrictFloat | StrictInt, _between(0, 100)]
Count = Annotated[StrictInt, _between(1, 1_000_000_000)]


# An HTTP token (RFC 9110): header names, cookie names.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")


def check_header_name(value: str) -> str:
    # HTTP/2 header names are lower-case tokens; Envoy matches names case-insensitively anyway.
    if value != value.lower() or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{safe_repr(value)} is not a lower-case HTTP header name")
    return value


def check_cookie_name(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{safe_repr(value)} is not a cookie name (1-256 letters, digits and !#$%&'*+.^_`|~-)")
    return value


def check_header_value(value: str) -> str:
    # Envoy refuses NUL, CR and LF in header values (and text_problem any control character).
    return check_text(value)


HeaderName = Annotated[StrictStr, AfterValidator(check_header_name)]
HeaderValue = Annotated[StrictStr, AfterValidator(check_header_value)]
CookieName = Annotated[StrictStr, AfterValidator(check_cookie_name)]


# -- retries (per service, per-route override) ------------------------------------------------

RetryOn = Literal["5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes", "refused-stream"]


class Backoff(FrozenModel):
    base: PositiveDuration = 0.025
    max: PositiveDuration | None = None  # default 10 x base


class Retries(FrozenModel):
    """Envoy's retry policy: ``attempts`` counts the first try (3 = one try and two retries)."""

    attempts: Annotated[StrictInt, Field(ge=1, le=10)] = 3
    retry_on: list[RetryOn] = Field(default_factory=lambda: ["5xx", "reset", "connect-failure"])
    status_codes: list[Annotated[StrictInt, Field(ge=100, le=599)]] = Field(default_factory=list)
    per_try_timeout: PositiveDuration | None = None
    backoff: Backoff | None = None


# -- routes ----------------------------------------------------------------------------------


class Destination(FrozenModel):
    """One arm of a weighted split: a service, or one of its subsets."""

    service: Name | None = None  # in a service's own routes: that service (the default)
    subset: Name | None = None
    weight: Annotated[StrictInt, _between(0, 100)]


class Mirror(FrozenModel):
    """A copy of ``percent`` of the requests goes to ``service`` (``subset``); its answers are dropped."""

    service: Name | None = None
    subset: Name | None = None
    percent: Percent = 100


class Rewrite(FrozenModel):
    prefix: PathPrefix | None = None  # replaces the matched prefix (or the whole exact path)
    host: Host | None = None  # the Host / :authority header sent upstream


class Delay(FrozenModel):
    duration: PositiveDuration
    percent: Percent = 100


class Abort(FrozenModel):
    status: Annotated[StrictInt, _between(200, 599)]
    percent: Percent = 100


class Fault(FrozenModel):
    """Injected faults (Envoy's fault filter): a delay before forwarding, or an immediate error."""

    delay: Delay | None = None
    abort: Abort | None = None


class Route(FrozenModel):
    """Matches a request (all given conditions must hold) and says where it goes.

    Path: exactly one of ``prefix``, ``path`` (exact) or ``regex`` (RE2, whole path).
    Target: ``service`` (optionally one ``subset`` of it) or a weighted ``split``.
    """

    prefix: PathPrefix | None = None
    path: PathPrefix | None = None
    regex: Text | None = None  # checked against RE2 in crosscheck
    methods: list[Text] = Field(default_factory=list)
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)  # exact values
    service: Name | None = None
    subset: Name | None = None
    split: list[Destination] = Field(default_factory=list)
    rewrite: Rewrite | None = None
    mirror: Mirror | None = None
    fault: Fault | None = None
    retries: Retries | None = None  # overrides the service's
    timeout: PositiveDuration | None = None

    def destinations(self, default_service: str | None = None) -> list[tuple[str, str | None]]:
        """Every (service, subset) the route sends to, mirror included, in order."""
        out: list[tuple[str, str | None]] = []
        if self.split:
            out += [(d.service or default_service or "", d.subset) for d in self.split]
        elif self.service is not None or default_service is not None:
            out.append((self.service or default_service or "", self.subset))
        if self.mirror is not None:
            out.append((self.mirror.service or default_service or "", self.mirror.subset))
        return out


# -- upstream resilience (per service, part of its clusters) ----------------------------------


class HashOn(FrozenModel):
    """The key of ring_hash / maglev: a request header or a cookie (exactly one)."""

    header: HeaderName | None = None
    cookie: CookieName | None = None


class LoadBalancer(FrozenModel):
    policy: Literal["round_robin", "least_request", "random", "ring_hash", "maglev"] = "round_robin"
    hash_on: HashOn | None = None  # required by ring_hash and maglev
    # Below this share of healthy endpoints Envoy ignores health and uses all of them (Envoy's
    # default 50); 0 turns that off: an unhealthy endpoint is then never used.
    panic_threshold: Percent | None = None


class OutlierDetection(FrozenModel):
    """Passive health: an endpoint answering ``consecutive_5xx`` 5xx in a row is ejected for
    ``base_ejection_time`` x (times ejected); ``interval`` is how often ejections are reconsidered."""

    consecutive_5xx: Count = 5
    interval: PositiveDuration = 10.0
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_percent: Annotated[StrictInt, _between(0, 100)] = 10  # Envoy ejects at least one host


class RetryBudget(FrozenModel):
    """Retries in flight may be at most ``percent`` of the requests in flight (but always
    ``min_concurrency``): retries cannot multiply load on a struggling service."""

    percent: Percent = 20.0
    min_concurrency: Count = 3


class CircuitBreakers(FrozenModel):
    """Limits per Envoy (not per endpoint); past them Envoy fails fast with 503. Unset: Envoy's 1024
    (3 for retries)."""

    max_connections: Count | None = None
    max_pending_requests: Count | None = None
    max_requests: Count | None = None
    max_retries: Annotated[StrictInt, _between(0, 1_000_000_000)] | None = None
    retry_budget: RetryBudget | None = None  # instead of max_retries


class HealthCheck(FrozenModel):
    """Active HTTP health checks from every Envoy that calls the service: a 200 is healthy."""

    path: PathPrefix = "/health"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    healthy_threshold: Annotated[StrictInt, _between(1, 100)] = 1
    unhealthy_threshold: Annotated[StrictInt, _between(1, 100)] = 2


# Labels an endpoint must carry (all of them) to be in the subset.
Subset = dict[Text, Text]
