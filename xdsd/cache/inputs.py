"""What a generator hands the cache, beyond plain protobuf messages, and the generator protocol.

The cache calls a generator and stores what it returns; it never interprets a node or the mesh.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message


@dataclass(frozen=True, slots=True)
class Encoded:
    """A resource already serialized: what the cache would otherwise get from a message."""

    name: str
    type_url: str
    body: bytes
    version: str


class Patched(list):  # type: ignore[type-arg]
    """A generated list equal to ``base`` (an earlier generated list) but at positions ``changed``:
    lets the cache patch a snapshot without comparing every position.

    One step back only: the cache compares ``base`` with the list it built the last snapshot from,
    never what that list was patched from. So a Patched made from a Patched cuts its base's own
    ``base``: otherwise every registration would add a link (a copy of the list, and the messages
    it held) to a chain that lives as long as the group is patched."""

    __slots__ = ("base", "changed")

    def __init__(self, items: list[object], base: list[object], changed: list[int]) -> None:
        super().__init__(items)
        if isinstance(base, Patched):
            base.base = None
        self.base: list[object] | None = base
        self.changed = changed


Generated = Mapping[str, Sequence[Message | Encoded]]  # type URL -> resources


class Generator(Protocol):
    """What the cache needs of the code that knows what each key (node group) should hold.

    ``begin`` starts a revision with its input (opaque to the cache) and an optional hint about what
    changed since the last one; ``generate`` builds one key's resources (also between revisions, for
    a key seen for the first time); ``end`` closes the revision (forget what it did not use)."""

    def begin(self, revision: object, hint: object = None) -> None: ...
    def generate(self, key: Hashable) -> Generated: ...
    def end(self) -> None: ...
