"""Staged rollout of file revisions (``mesh.rollout: {canary: 10%, wait: 10s}``).

A new file revision goes first to the canaries: a deterministic share of each service's (or
gateway's) connected proxies, chosen by a hash of the node id, at least one per service. If a canary
NACKs it within ``wait``, the canaries get the previous revision back and nobody else ever sees the
new one; otherwise everyone gets it. Registration-only changes are never staged.

This module holds the state and the choice of canaries; the controller serves the two meshes and
the server moves canary streams between node groups (``Fleet``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from xdsd.model import Mesh
from xdsd.model.mesh import Rollout as RolloutSettings


class Fleet(Protocol):
    """The connected proxies, as the server knows them."""

    def clusters(self) -> dict[str, list[str]]:
        """node.cluster -> the ids of its connected nodes."""
        ...

    def set_canary(self, node_ids: Iterable[str], canary: bool) -> None:
        """Serve these nodes their node group's canary snapshot (or the regular one again)."""
        ...


def _rank(node_id: str) -> bytes:
    return hashlib.sha256(node_id.encode("utf-8", "surrogateescape")).digest()


def choose_canaries(clusters: dict[str, list[str]], share: float) -> frozenset[str]:
    """Per cluster, the ``share`` percent of its nodes with the lowest hash of node id (at least one):
    the same nodes every time for the same fleet."""
    chosen: set[str] = set()
    for nodes in clusters.values():
        if not nodes:
            continue
        count = max(1, math.ceil(len(nodes) * share / 100.0))
        chosen.update(sorted(set(nodes), key=_rank)[:count])
    return frozenset(chosen)


@dataclass
class Rollout:
    previous: Mesh  # the file mesh everyone else keeps meanwhile
    candidate: Mesh  # the new file mesh the canaries get
    canaries: frozenset[str]
    settings: RolloutSettings
    how: str  # how the revision came (file, apply, ...)
    started: float = field(default_factory=time.time)
    result: str | None = None  # "promoted", "rolled_back", "superseded"
    nack: dict[str, str] | None = None  # the NACK that rolled it back: node, type, error

    @property
    def active(self) -> bool:
        return self.result is None

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.result or "canary",
            "started": self.started,
            "wait_seconds": self.settings.wait,
            "canary_percent": self.settings.canary,
            "canaries": sorted(self.canaries),
            "candidate": self.candidate.summary(),
            "nack": self.nack,
        }
