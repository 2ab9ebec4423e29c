"""A registered instance, and the validation of registration input (errors name the field).

Rules (every client-sent string is checked before anything is stored):
- Strings are valid Unicode (no lone surrogates: they cannot be encoded to UTF-8, so neither to JSON
  on disk nor to a protobuf) and carry no control characters; every pattern matches the whole value.
- Integers are JSON integers (``true`` is not 1), checked against their range without converting
  them to floats (a 400-digit integer is an error, not an OverflowError).
- ``instance_id`` defaults to ``address:port``, ``[address]:port`` for an IPv6 address.
- An instance is only built from input that passed: what is stored can be served.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from xdsd.api.v1 import registration_pb2
from xdsd.errors import FieldError
from xdsd.model.fields import check_host, check_name, is_ip, parse_duration

MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_ZONE = 128
# A host name (253, plus a trailing dot) and ":65535" fit: the default id of any valid address.
MAX_INSTANCE_ID = 260
MAX_NAME = 63
MAX_HOST = 254
MAX_TOKEN_ID = 128
MAX_DURATION_TEXT = 32
DEFAULT_TTL = 10.0
MAX_TTL = 86400.0
MAX_WEIGHT = 1_000_000
STATES = ("ACTIVE", "DRAINING")

_ID_RE = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]*")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FIELDS = ("service", "instance_id", "address", "port", "weight", "zone", "labels", "ttl")


class RegistrationError(Exception):
    """Bad input: HTTP 400 / INVALID_ARGUMENT, one error per field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


# -- reusable checks ----------------------------------------------------------------------


class BigInt:
    """A JSON integer literal too long to be worth converting (body.MAX_INT_DIGITS): every
    integer field refuses it by its range, naming the field."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {len(self.digits.lstrip('-'))} digits"


def show(value: object, limit: int = 64) -> str:
    """A client value inside an error message: repr (escapes surrogates and control characters,
    so the message is always encodable), cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"  # repr: slow, or refused
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_path(parent: str, key: object) -> str:
    """``labels.version``, or ``labels["a b"]`` for a key that is not plain (JSON-escaped)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{parent}[{key}]"
    text = str(key)
    if _PLAIN_KEY_RE.fullmatch(text):
        return f"{parent}.{text}" if parent else text
    quoted = json.dumps(text[:64] + ("..." if len(text) > 64 else ""))  # ensure_ascii: always encodable
    return f"{parent}[{quoted}]"


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored and served as text, or None."""
    if _has_surrogate(value):
        return "not valid Unicode (a lone surrogate)"
    if _CONTROL_RE.search(value):
        return "must not contain control characters"
    return None


def unencodable(data: object, path: str = "") -> list[FieldError]:
    """Every key or string anywhere in ``data`` that is not valid Unicode, by field path. Iterative:
    safe at any depth."""
    errors: list[FieldError] = []
    stack: list[tuple[str, object]] = [(path, data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                errors.append(FieldError(where or "body", "not valid Unicode (a lone surrogate)"))
        elif isinstance(item, Mapping):
            for k, v in item.items():
                sub = key_path(where, k)
                if isinstance(k, str) and _has_surrogate(k):
                    errors.append(FieldError(sub, "key is not valid Unicode (a lone surrogate)"))
                stack.append((sub, v))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    errors.sort(key=lambda e: e.path)
    return errors


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_instance_id(address: str, port: int) -> str:
    """``10.0.0.7:8080``, ``vm7.internal:8080``, ``[::1]:8080``."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@functools.lru_cache(maxsize=65536)
def address_key(address: str) -> str:
    """The form two spellings of one address share: an IP in its compressed form, a host name in
    lower case without the trailing dot. Conflicts between instances are found by this key."""
    if is_ip(address):
        return ipaddress.ip_address(address).compressed
    return address.lower().rstrip(".")


def canonical_address(address: str) -> str:
    """What is stored and served: an IP address compressed (``::1``, not ``0::0001``); a host name as given."""
    return ipaddress.ip_address(address).compressed if is_ip(address) else address


# -- the fields ---------------------------------------------------------------------------


def _check_service(value: object, path: str = "service") -> list[FieldError]:
    if not isinstance(value, str):
        return [FieldError(path, "must be a string")]
    if not value:
        return [FieldError(path, "required")]
    if len(value) > MAX_NAME:
        return [FieldError(path, f"must be at most {MAX_NAME} characters, got {len(value)}")]
    try:
        check_name(value)
    except ValueError as exc:
        return [FieldError(path, str(exc))]
    return []


def _check_instance_id(value: object, path: str = "instance_id") -> list[FieldError]:
    if not isinstance(value, str):
        return [FieldError(path, "must be a string")]
    if not value:
        return [FieldError(path, "required")]
    if len(value) > MAX_INSTANCE_ID or not _ID_RE.fullmatch(value):
        return [FieldError(path, f"must be 1-{MAX_INSTANCE_ID} characters of letters, digits, '.', '_', ':', "
                                 f"'[', ']' or '-', starting with a letter, a digit or '[', got {show(value)}")]
    return []


def _check_address(value: object) -> list[FieldError]:
    if not isinstance(value, str):
        return [FieldError("address", "must be a string")]
    if not value:
        return [FieldError("address", "required")]
    problem = text_problem(value)
    if problem is not None:
        return [FieldError("address", problem)]
    if len(value) > MAX_HOST:
        return [FieldError("address", f"must be at most {MAX_HOST} characters, got {len(value)}")]
    try:
        check_host(value)
    except ValueError as exc:
        return [FieldError("address", str(exc))]
    return []


def _check_int(path: str, value: object, low: int, high: int) -> list[FieldError]:
    if isinstance(value, BigInt):
        return [FieldError(path, f"must be {low}..{high}, got {value!r}")]
    if not is_int(value):
        return [FieldError(path, f"must be an integer {low}..{high}, got {type(value).__name__}")]
    assert isinstance(value, int)
    if not low <= value <= high:
        return [FieldError(path, f"must be {low}..{high}, got {show(value, 24)}")]
    return []


def _check_zone(value: object) -> list[FieldError]:
    if not isinstance(value, str):
        return [FieldError("zone", "must be a string")]
    problem = text_problem(value)
    if problem is None and len(value) > MAX_ZONE:
        problem = f"must be at most {MAX_ZONE} characters, got {len(value)}"
    return [] if problem is None else [FieldError("zone", problem)]


def _check_labels(value: object) -> list[FieldError]:
    if not isinstance(value, Mapping):
        return [FieldError("labels", "must be an object of string values")]
    if len(value) > MAX_LABELS:
        return [FieldError("labels", f"at most {MAX_LABELS} labels, got {len(value)}")]
    errors: list[FieldError] = []
    for k, v in value.items():
        path = key_path("labels", k)
        if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
            errors.append(FieldError(path, "a label key is 1-63 letters, digits, '.', '_', '/' or '-', "
                                           "starting with a letter or digit"))
        if not isinstance(v, str):
            errors.append(FieldError(path, "must be a string"))
            continue
        problem = text_problem(v)
        if problem is None and len(v) > MAX_LABEL_VALUE:
            problem = f"value longer than {MAX_LABEL_VALUE} characters"
        if problem is not None:
            errors.append(FieldError(path, problem))
    return errors


def ttl_seconds(value: object) -> float:
    """A TTL: seconds (a JSON number) or a duration (``"10s"``); > 0 and at most 24h. ValueError if not."""
    if isinstance(value, str):
        if len(value) > MAX_DURATION_TEXT:
            raise ValueError(f"must be a duration such as '10s', got a string of {len(value)} characters")
        seconds = parse_duration(value)
    elif is_int(value):
        assert isinstance(value, int)
        if not 0 < value <= MAX_TTL:  # compared as an int: a 400-digit one is no OverflowError
            raise ValueError(f"must be greater than 0 and at most 24h, got {show(value, 24)}")
        seconds = float(value)
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, BigInt):
        raise ValueError(f"must be greater than 0 and at most 24h, got {value!r}")
    else:
        raise ValueError(f"must be a duration such as '10s' or a number of seconds, got {type(value).__name__}")
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TTL):
        raise ValueError(f"must be greater than 0 and at most 24h, got {show(value, 24)}")
    return seconds


# -- a registration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationInput:
    """A registration that passed every field rule."""

    service: str
    instance_id: str
    address: str
    port: int
    weight: int = 1
    zone: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ttl: float = DEFAULT_TTL

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RegistrationInput:
        """Validates every field; RegistrationError lists each problem by field path. ``null`` is
        the same as an absent optional field."""
        if not isinstance(data, Mapping):
            raise RegistrationError([FieldError("body", "must be a JSON object")])
        errors = unencodable(data)
        if errors:
            raise RegistrationError(errors)
        errors = [FieldError(key_path("", k), "unknown field") for k in data if k not in _FIELDS]
        given = {k: v for k, v in data.items() if k in _FIELDS and v is not None}
        errors += _check_service(given.get("service", ""))
        errors += _check_address(given.get("address", ""))
        if "port" not in given:
            errors.append(FieldError("port", "required"))
        else:
            errors += _check_int("port", given["port"], 1, 65535)
        if "weight" in given:
            errors += _check_int("weight", given["weight"], 1, MAX_WEIGHT)
        if given.get("zone", "") != "":
            errors += _check_zone(given["zone"])
        if "labels" in given:
            errors += _check_labels(given["labels"])
        ttl = DEFAULT_TTL
        if "ttl" in given:
            try:
                ttl = ttl_seconds(given["ttl"])
            except ValueError as exc:
                errors.append(FieldError("ttl", str(exc)))
        instance_id = given.get("instance_id", "")
        if instance_id != "":
            errors += _check_instance_id(instance_id)
        if errors:
            raise RegistrationError(errors)
        address = canonical_address(given["address"])
        if instance_id == "":
            instance_id = default_instance_id(address, given["port"])
            errors = _check_instance_id(instance_id)
            if errors:
                raise RegistrationError(errors)
        return cls(service=given["service"], instance_id=instance_id, address=address, port=given["port"],
                   weight=given.get("weight", 1), zone=given.get("zone") or None,
                   labels=dict(given.get("labels", {})), ttl=ttl)


def check_ids(service: object, instance_id: object) -> tuple[str, str]:
    """The (service, instance_id) of a heartbeat or deregistration; RegistrationError if malformed."""
    errors = unencodable({"service": service, "instance_id": instance_id})
    if not errors:
        errors = _check_service(service) + _check_instance_id(instance_id)
    if errors:
        raise RegistrationError(errors)
    assert isinstance(service, str) and isinstance(instance_id, str)
    return service, instance_id


def check_service_filter(service: object) -> str | None:
    """The ``service`` of a List: empty means every service."""
    if service is None or service == "":
        return None
    errors = unencodable({"service": service}) or _check_service(service)
    if errors:
        raise RegistrationError(errors)
    assert isinstance(service, str)
    return service


# -- the instance -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    instance_id: str
    address: str
    port: int
    weight: int = 1
    zone: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ttl: float = DEFAULT_TTL
    state: str = "ACTIVE"  # or DRAINING
    expires_at: float = 0.0  # unix time; for DRAINING, when it is removed
    token_id: str = ""  # the id of the token that registered it (per-token quota); "" without auth

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.instance_id)

    @property
    def address_key(self) -> tuple[str, str, int]:
        """An address:port belongs to one instance of a service (spellings of one IP are one)."""
        return (self.service, address_key(self.address), self.port)

    def as_json(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict (which deep-copies field by field): the store writes
        # every changed instance on each save.
        return {"service": self.service, "instance_id": self.instance_id, "address": self.address, "port": self.port,
                "weight": self.weight, "zone": self.zone, "labels": dict(self.labels), "ttl": self.ttl,
                "state": self.state, "expires_at": self.expires_at, "token_id": self.token_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Instance:
        """Trusted data (as_json of an instance); ``load`` for anything read from outside."""
        return cls(**data)

    @classmethod
    def load(cls, data: object) -> Instance:
        """An instance read back from a store, checked like a registration (a file written before
        these rules may hold what cannot be served). RegistrationError names what is wrong."""
        if not isinstance(data, Mapping):
            raise RegistrationError([FieldError("", "must be an object")])
        errors = [FieldError(key_path("", k), "unknown field") for k in data if k not in _STORED]
        errors += _stored_problems(data)
        try:
            reg = RegistrationInput.parse({k: v for k, v in data.items() if k in _FIELDS})
        except RegistrationError as exc:
            errors += exc.errors
        if errors:
            raise RegistrationError(errors)
        inst = cls.of(reg, float(data.get("expires_at", 0.0)), str(data.get("token_id", "")),
                      state=str(data.get("state", "ACTIVE")))
        errors = servable(inst)
        if errors:
            raise RegistrationError(errors)
        return inst

    @classmethod
    def of(cls, reg: RegistrationInput, expires_at: float, token_id: str = "", state: str = "ACTIVE") -> Instance:
        return cls(service=reg.service, instance_id=reg.instance_id, address=reg.address, port=reg.port,
                   weight=reg.weight, zone=reg.zone, labels=dict(reg.labels), ttl=reg.ttl, state=state,
                   expires_at=expires_at, token_id=token_id)


_STORED = (*_FIELDS, "state", "expires_at", "token_id")
# google.protobuf.Timestamp's range ends with the year 9999.
MAX_TIMESTAMP = 253_402_300_799


def _stored_problems(data: Mapping[str, Any]) -> list[FieldError]:
    """The fields a store adds to a registration: state, expires_at, token_id."""
    errors: list[FieldError] = []
    state, expires, token_id = data.get("state", "ACTIVE"), data.get("expires_at", 0.0), data.get("token_id", "")
    if state not in STATES:
        errors.append(FieldError("state", f"must be ACTIVE or DRAINING, got {show(state)}"))
    if not (is_int(expires) or isinstance(expires, float)) or not 0 <= expires <= MAX_TIMESTAMP:
        errors.append(FieldError("expires_at", f"must be a unix time 0..{MAX_TIMESTAMP}"))
    if not isinstance(token_id, str) or len(token_id) > MAX_TOKEN_ID or text_problem(token_id) is not None:
        errors.append(FieldError("token_id", f"must be a string of at most {MAX_TOKEN_ID} characters"))
    return errors


def instance_pb(i: Instance) -> registration_pb2.Instance:
    """The registration API's view of an instance (gRPC, and as JSON over HTTP)."""
    pb = registration_pb2.Instance(
        service=i.service, instance_id=i.instance_id, address=i.address, port=i.port, weight=i.weight,
        zone=i.zone or "", labels=i.labels,
        state=registration_pb2.Instance.DRAINING if i.state == "DRAINING" else registration_pb2.Instance.ACTIVE,
    )
    pb.ttl.CopyFrom(duration_pb2.Duration(seconds=int(i.ttl), nanos=int((i.ttl % 1) * 1e9)))
    pb.expires_at.CopyFrom(timestamp_pb2.Timestamp(seconds=int(i.expires_at), nanos=int((i.expires_at % 1) * 1e9)))
    return pb


def instance_json(i: Instance) -> dict[str, Any]:
    return json_format.MessageToDict(instance_pb(i), preserving_proto_field_name=True)


def servable(inst: Instance) -> list[FieldError]:
    """The last check before an instance is stored: it encodes to JSON (the store, the HTTP API)
    and to the protobufs it is served as (an EDS endpoint in its locality; the registration API's
    Instance). The field rules make this pass; it is here so that no rule change can ever store
    what cannot be served."""
    try:
        json.dumps(inst.as_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")
        lb = endpoint_components_pb2.LbEndpoint()
        lb.endpoint.address.socket_address.address = inst.address
        lb.endpoint.address.socket_address.port_value = inst.port
        lb.load_balancing_weight.value = inst.weight
        locality = base_pb2.Locality(zone=inst.zone or "")
        lb.SerializeToString()
        locality.SerializeToString()
        json.dumps(instance_json(inst)).encode("utf-8")
    except (ValueError, TypeError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        return [FieldError("", f"cannot be served: {type(exc).__name__}")]
    return []
