"""Reusable field types whose validation errors read well (``must be 1..65535``)."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, StrictInt, StrictStr

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1..65535, got {value}")
    return value


def check_weight(value: int) -> int:
    # Envoy's load_balancing_weight is >= 1; a bound keeps a locality's sum far below 2^32.
    if not 1 <= value <= 1_000_000:
        raise ValueError(f"must be 1..1000000, got {value}")
    return value


def check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


@functools.lru_cache(maxsize=65536)
def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_host(value: str) -> str:
    """An IP address or a DNS host name."""
    if is_ip(value):
        return value
    host = value[:-1] if value.endswith(".") else value
    if not host or len(host) > 253 or not all(_HOST_LABEL_RE.match(p) for p in host.split(".")):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    if host.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return value


def check_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    return value


Name = Annotated[StrictStr, AfterValidator(check_name)]
Port = Annotated[StrictInt, AfterValidator(check_port)]
Weight = Annotated[StrictInt, AfterValidator(check_weight)]
IPAddress = Annotated[StrictStr, AfterValidator(check_ip)]
Host = Annotated[StrictStr, AfterValidator(check_host)]
PathPrefix = Annotated[StrictStr, AfterValidator(check_prefix)]


# google.protobuf.Duration's limit, which every Envoy duration field has.
MAX_DURATION_SECONDS = 315_576_000_000
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"`` -> seconds. Plain numbers are not accepted: a unit is required."""
    if not isinstance(value, str):
        raise ValueError(f"must be a duration string such as '250ms' or '2s', got {value!r}")
    match = _DURATION_RE.match(value.strip())
    if not match:
        raise ValueError(f"must be a duration such as '250ms', '2s', '1m' or '1h', got {value!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not seconds <= MAX_DURATION_SECONDS:  # also catches inf from a very long digit string
        raise ValueError(f"must be at most {MAX_DURATION_SECONDS}s (10000 years), got {value!r}")
    # Whole nanoseconds, like protobuf's Duration: "0.0000000001s" is zero (not a positive duration
    # that would print as "0s"), and format_duration(x) always reads back as exactly x.
    return round(seconds * 1e9) / 1e9


def check_positive_duration(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def format_duration(seconds: float) -> str:
    """Seconds -> a duration string that ``parse_duration`` reads back (``"0.25s"``, ``"3600s"``)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(check_positive_duration), PlainSerializer(format_duration)
]


_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


def check_trust_domain(value: str) -> str:
    # SPIFFE: the trust domain is lower-case letters, digits, dots and dashes.
    if not _TRUST_DOMAIN_RE.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a valid trust domain: use lower-case letters, digits, '.' and '-'")
    return value


TrustDomain = Annotated[StrictStr, AfterValidator(check_trust_domain)]
