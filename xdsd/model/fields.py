"""Reusable field types whose validation errors read well (``must be 1..65535``).

Every pattern here is applied with ``re.fullmatch``: ``$`` would also match before a final newline,
so ``"127.0.0.1\\n"`` or ``"reviews\\n"`` would pass.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, StrictInt, StrictStr

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

# Names starting with this are xdsd's own (Envoy resources such as the bootstrap clusters
# ``xds_cluster`` and ``xdsd_authz``, the telemetry clusters ``xdsd-admin`` and ``xdsd-otel-collector``,
# the stats prefix ``xdsd_stats``): no service, gateway or subset may take one. Every other internal
# name contains ``|`` (``inbound|<port>|<svc>``, ``outbound|<port>|<svc>``, ``stats|<port>``) or ``~``
# (``<svc>~<subset>``), which a name cannot contain, or is a SPIFFE ID (``spiffe://...``).
RESERVED_PREFIX = "xds"

# The longest string anywhere in a mesh config (names, addresses, paths, header values, regexes,
# labels, zones, ...). Far longer than any real value; it keeps error messages and Envoy
# resources of sane size.
MAX_STRING = 4096


# Unicode's control characters (category Cc) and surrogates (Cs).
_UNSERVABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be served to Envoy as a string, or None. Every string of a mesh config
    must be at most ``MAX_STRING`` characters of UTF-8 text (no lone surrogates, which YAML's
    ``"\\ud800"`` escapes make and protobuf cannot encode) without control characters (U+0000-U+001F,
    U+007F-U+009F: NUL, CR and LF are refused by Envoy in header values, and no field of the mesh
    needs any of them)."""
    if len(value) > MAX_STRING:
        return f"at most {MAX_STRING} characters, got {len(value)}"
    bad = _UNSERVABLE_RE.search(value)
    if bad is None:
        return None
    kind = "lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "control character"
    return f"{kind} U+{ord(bad.group()):04X} is not allowed: {safe_repr(value)}"


def safe_repr(value: str, limit: int = 80) -> str:
    """``repr(value)``, shortened: safe to print and to log (escapes controls and surrogates)."""
    text = repr(value if len(value) <= limit else value[:limit])
    return text if len(value) <= limit else f"{text}... ({len(value)} characters)"


def check_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{safe_repr(value)} is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def reserved_name_problem(value: str) -> str | None:
    """Why a service, gateway or subset may not be called ``value``, or None."""
    if value.startswith(RESERVED_PREFIX):
        return (f"{value!r} is reserved for xdsd's own resources: names starting with "
                f"{RESERVED_PREFIX!r} cannot name a service, gateway or subset")
    return None


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1..65535, got {value}")
    return value


def check_weight(value: int) -> int:
    # Envoy's load_balancing_weight is >= 1; the sum per locality must fit in 32 bits (crosscheck).
    if not 1 <= value <= 1_000_000:
        raise ValueError(f"must be 1..1000000, got {value}")
    return value


def check_ip(value: str) -> str:
    if "%" in value:
        raise ValueError(f"{safe_repr(value)} is not an IP address (IPv6 zone ids such as '%eth0' are not supported)")
    if not is_ip(value):
        raise ValueError(f"{safe_repr(value)} is not an IP address")
    return value


@functools.lru_cache(maxsize=65536)
def is_ip(value: str) -> bool:
    """An IPv4 or IPv6 address as Envoy reads it: no IPv6 zone id (``fe80::1%eth0``), which
    Python's ``ipaddress`` accepts with any text after the ``%``."""
    if "%" in value:
        return False
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
    if (not host or len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(p) for p in host.split("."))
            or host.replace(".", "").isdigit()):
        raise ValueError(f"{safe_repr(value)} is neither an IP address nor a host name")
    return value


def check_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {safe_repr(value)}")
    return check_text(value)


Text = Annotated[StrictStr, AfterValidator(check_text)]
Name = Annotated[StrictStr, AfterValidator(check_name)]
Port = Annotated[StrictInt, AfterValidator(check_port)]
Weight = Annotated[StrictInt, AfterValidator(check_weight)]
IPAddress = Annotated[StrictStr, AfterValidator(check_ip)]
Host = Annotated[StrictStr, AfterValidator(check_host)]
PathPrefix = Annotated[StrictStr, AfterValidator(check_prefix)]


# The longest duration in a mesh config: one year. Envoy refuses durations from 2^63 ns (~292
# years) on ("Duration out-of-range"), and adds some of them to its clock; no timeout, interval
# or lifetime of a mesh needs more than a year.
MAX_DURATION_SECONDS = 365 * 86400
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"`` -> seconds. Plain numbers are not accepted: a unit
    is required. Spaces around the value are allowed, no other white space."""
    if not isinstance(value, str):
        raise ValueError(f"must be a duration string such as '250ms' or '2s', got {value!r}")
    match = _DURATION_RE.fullmatch(value.strip(" "))
    if not match:
        raise ValueError(f"must be a duration such as '250ms', '2s', '1m' or '1h', got {safe_repr(value)}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not seconds <= MAX_DURATION_SECONDS:  # also catches inf from a very long digit string
        raise ValueError(f"must be at most 8760h (365 days), got {safe_repr(value)}")
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


_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")


def check_trust_domain(value: str) -> str:
    # SPIFFE: the trust domain is lower-case letters, digits, dots and dashes (at most 255).
    if not _TRUST_DOMAIN_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"{safe_repr(value)} is not a valid trust domain: use lower-case letters, digits, '.' and '-'")
    return value


TrustDomain = Annotated[StrictStr, AfterValidator(check_trust_domain)]
