"""A registered instance, and the validation of registration input (errors name the field)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationError

from xdsd.errors import FieldError, format_loc
from xdsd.model.fields import Host, Name, Port, Weight, parse_duration

MAX_LABELS = 64
DEFAULT_TTL = 10.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


class RegistrationError(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def _check_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError("must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return value


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(value)}")
    for k, v in value.items():
        if not _LABEL_KEY_RE.match(k):
            raise ValueError(f"label key {k!r} must be 1-63 letters, digits, '.', '_', '/' or '-'")
        if len(v) > 256:
            raise ValueError(f"label {k!r}: value longer than 256 characters")
    return value


def _ttl(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a duration such as '10s'")
    seconds = float(value) if isinstance(value, int | float) else parse_duration(value)
    if not 0 < seconds <= 86400:
        raise ValueError(f"must be greater than 0 and at most 24h, got {value!r}")
    return seconds


class RegistrationInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: Name
    instance_id: Annotated[StrictStr, AfterValidator(_check_id)]
    address: Host
    port: Port
    weight: Weight = 1
    zone: StrictStr | None = None
    labels: Annotated[dict[str, str], AfterValidator(_check_labels)] = Field(default_factory=dict)
    ttl: Annotated[float, AfterValidator(lambda v: v)] = DEFAULT_TTL

    @classmethod
    def parse(cls, data: dict[str, Any]) -> RegistrationInput:
        data = dict(data)
        errors: list[FieldError] = []
        if "ttl" in data and data["ttl"] is not None:
            try:
                data["ttl"] = _ttl(data["ttl"])
            except ValueError as exc:
                errors.append(FieldError("ttl", str(exc)))
                data.pop("ttl")
        elif "ttl" in data:
            data.pop("ttl")
        if not data.get("instance_id") and isinstance(data.get("address"), str) and isinstance(data.get("port"), int):
            data["instance_id"] = f"{data['address']}:{data['port']}"
        try:
            model = cls.model_validate(data)
        except ValidationError as exc:
            for e in exc.errors():
                msg = str(e.get("msg", "")).removeprefix("Value error, ")
                if e.get("type") == "extra_forbidden":
                    msg = "unknown field"
                errors.append(FieldError(format_loc(tuple(e["loc"])), msg))
            raise RegistrationError(errors) from None
        if errors:
            raise RegistrationError(errors)
        return model


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

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.instance_id)

    def as_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies field by field, ~10x slower (the store writes
        # every instance on each change).
        return {"service": self.service, "instance_id": self.instance_id, "address": self.address, "port": self.port,
                "weight": self.weight, "zone": self.zone, "labels": dict(self.labels), "ttl": self.ttl,
                "state": self.state, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Instance:
        return cls(**data)
