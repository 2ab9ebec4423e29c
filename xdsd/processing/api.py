"""The processor API: what a processor sees (``Message``) and what it may answer (``Result``).

A processor is a callable ``processor(message) -> Result | None`` (``None`` is ``Continue()``). It
runs once per processed phase of one HTTP request: request headers, request body, response
headers, response body (which phases is the mesh's ``processing.phases``). It runs in a worker
thread, never on xdsd's event loop, and may block; it must not keep state across requests without
its own locking.

Two shapes are accepted:

- a function: ``def processor(message: Message) -> Result | None``; the mesh's ``args`` are
  ``message.args``;
- a subclass of ``Processor``: built once per mesh revision with the mesh's ``args``
  (``__init__(self, args)``; raise ``ValueError`` for bad arguments: xdsd reports it as a field-path
  error and keeps the last good config), then called per phase.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Phase = Literal["request_headers", "request_body", "response_headers", "response_body"]
PHASES: tuple[Phase, ...] = ("request_headers", "request_body", "response_headers", "response_body")


class Headers(Mapping[str, str]):
    """Read-only HTTP headers: names are lower case (as Envoy sends them); a header sent more than
    once reads as its values joined with ``,``; ``all(name)`` gives each value."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: dict[str, list[str]] = {}
        for name, value in pairs:
            self._items.setdefault(name.lower(), []).append(value)

    def __getitem__(self, name: str) -> str:
        return ",".join(self._items[name.lower()])

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def all(self, name: str) -> list[str]:
        return list(self._items.get(name.lower(), ()))

    def __repr__(self) -> str:
        return f"Headers({dict(self)!r})"




@dataclass(frozen=True, slots=True)
class Message:
    """One phase of one HTTP request, as a processor sees it.

    ``headers`` are this phase's headers: the request's in request phases, the response's in
    response phases (in body phases, the headers of that direction when its headers phase was
    processed, else empty). ``request`` holds the request's headers in every phase when the
    ``request_headers`` phase is processed (else empty). ``body`` is the whole body (``body:
    buffered``) or one chunk (``streamed``; ``end_of_stream`` on the last); None in header phases.
    ``caller`` is the SPIFFE ID of the caller, verified by mTLS (sidecar inbound), or None (gateways:
    callers from outside carry no mesh identity). ``claims`` are a verified JWT's claims when the
    request carries one that Envoy checked (else None)."""

    phase: Phase
    headers: Headers = field(default_factory=Headers)
    body: bytes | None = None
    end_of_stream: bool = False
    request: Headers = field(default_factory=Headers)
    caller: str | None = None
    claims: Mapping[str, Any] | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    processor: str = ""

    @property
    def method(self) -> str:
        return self.request.get(":method", "")

    @property
    def path(self) -> str:
        return self.request.get(":path", "")

    @property
    def authority(self) -> str:
        return self.request.get(":authority", "")

    @property
    def status(self) -> int | None:
        """The response status (response phases), else None."""
        if not self.phase.startswith("response"):
            return None
        try:
            return int(self.headers.get(":status", ""))
        except ValueError:
            return None

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        if self.body is None:
            raise ValueError("this phase has no body")
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the phase pass unchanged."""


@dataclass(frozen=True, slots=True)
class Mutate:
    """Change this phase's headers: ``set`` overwrites (or adds), ``append`` adds a value beside any
    existing ones, ``remove`` deletes. Pseudo-headers (``:path``...) and ``host`` cannot be changed."""

    set: Mapping[str, str] = field(default_factory=dict)
    append: Mapping[str, str] = field(default_factory=dict)
    remove: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace this phase's body (body phases only). With ``body: buffered`` xdsd also sets
    ``content-length`` (and ``content-type`` when given) to match; ``headers`` are changed too."""

    body: bytes | str
    content_type: str | None = None
    headers: Mutate | None = None


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client now with ``status`` and ``body``; the request goes no further."""

    status: int
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)


Result = Continue | Mutate | ReplaceBody | Respond


class Processor:
    """Base class of processors that take arguments: built once per mesh revision with them.
    ``needs_buffered_body``: the processor reads whole bodies (the mesh must say ``body: buffered``).
    ``needs_body_headers``: the processor reads a body's headers (its content type and encoding):
    the mesh must list the headers phase of each body phase it lists."""

    needs_buffered_body: ClassVar[bool] = False
    needs_body_headers: ClassVar[bool] = False

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = args

    def __call__(self, message: Message) -> Result | None:  # pragma: no cover - the subclass's job
        raise NotImplementedError
