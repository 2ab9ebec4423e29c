"""Errors that name the field they are about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field: ``path`` is like ``services.reviews.endpoints[1].port``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class MeshError(Exception):
    """A mesh config (or a change to it) was rejected; ``errors`` says where and why."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def format_loc(loc: tuple[object, ...]) -> str:
    """``('services', 'reviews', 'endpoints', 1, 'port')`` -> ``services.reviews.endpoints[1].port``."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself was invalid"
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class StoreUnavailable(Exception):
    """The shared store (etcd) could not take or answer a request: unreachable, no quorum, timed
    out. The message names it; callers are answered HTTP 503 / gRPC UNAVAILABLE, and nothing changed."""
