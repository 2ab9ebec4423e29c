"""The incremental patch: when only some services' endpoints changed since a group's last output
(a registration), that output is patched — the assignments (and STRICT_DNS clusters) of those
services rebuilt, everything else the same list objects. The result equals a full generation
(tested); the work is O(changed services), not O(clusters)."""

from __future__ import annotations

import bisect
import itertools
import operator
from dataclasses import dataclass

from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.ca import Credentials
from xdsd.cache.inputs import Patched
from xdsd.generators import endpoints
from xdsd.generators.memo import Memo
from xdsd.generators.reuse import Target, assignment_of, service_cluster_of, uses_eds_of
from xdsd.model import Mesh
from xdsd.node import NodeGroup

# Where a group's service clusters sit: (offset of the first in the CLUSTER list, the targets in
# that order, the identity the clusters' TLS presents). ENDPOINT holds the EDS ones' assignments.
Layout = tuple[int, list["Target"], str | None]


@dataclass(slots=True)
class Generated:
    """What ``generate`` returned for a group, and from what: the base of the next patch."""

    mesh: Mesh
    credentials: Credentials
    out: dict[str, list[Message]]
    offset: int
    targets: list[Target]
    own_id: str | None
    # service -> [(position in CLUSTER, position in ENDPOINT or None for STRICT_DNS, target)],
    # worked out at the first patch and handed on while the layout holds.
    where: dict[str, list[tuple[int, int | None, Target]]] | _SortedTargets | None = None


def where_of(last: Generated) -> dict[str, list[tuple[int, int | None, Target]]] | _SortedTargets | None:
    """Which positions of ``last.out`` each service feeds (ENDPOINT holds the assignments of the
    EDS targets, in target order)."""
    where: dict[str, list[tuple[int, int | None, Target]]] = {}
    assignments = last.out[typeurls.ENDPOINT]
    offset = last.offset
    if len(assignments) == len(last.targets):  # every target is EDS (the usual case): same positions
        targets = last.targets
        if all(map(operator.le, map(_SERVICE, targets), map(_SERVICE, itertools.islice(targets, 1, None)))):
            return _SortedTargets(targets, offset)  # looked up by bisection: nothing to build
        for i, target in enumerate(last.targets):
            entries = where.get(target[0])
            if entries is None:
                where[target[0]] = [(offset + i, i, target)]
            else:
                entries.append((offset + i, i, target))
        return where
    j = 0
    for i, target in enumerate(last.targets):
        epos = None
        if j < len(assignments) and assignment_name(assignments[j]) == endpoints.cluster_name(*target):
            epos = j
            j += 1
        where.setdefault(target[0], []).append((last.offset + i, epos, target))
    return where if j == len(assignments) else None


_SERVICE = operator.itemgetter(0)


class _SortedTargets:
    """Where services feed when every target is EDS and the targets are sorted by service (as
    generators build them): a service's targets are one slice, found by bisection, and nothing is
    built for the lookup."""

    __slots__ = ("offset", "targets")

    def __init__(self, targets: list[Target], offset: int) -> None:
        self.targets = targets
        self.offset = offset

    def get(self, name: str) -> list[tuple[int, int | None, Target]] | None:
        lo = bisect.bisect_left(self.targets, name, key=_SERVICE)
        hi = bisect.bisect_right(self.targets, name, lo=lo, key=_SERVICE)
        return [(self.offset + i, i, self.targets[i]) for i in range(lo, hi)] or None


def assignment_name(message: Message) -> str:
    return message.name if isinstance(message, endpoints.Encoded) else message.cluster_name  # type: ignore[attr-defined,no-any-return]


def patch(mesh: Mesh, group: NodeGroup, last: Generated, changed: frozenset[str], memo: Memo) -> Generated | None:
    """``last`` with what ``changed`` services feed rebuilt; None if that moves anything (a service
    switching between EDS and STRICT_DNS adds or drops an assignment): then generate in full."""
    where = last.where if last.where is not None else where_of(last)
    if where is None:
        return None
    clusters: list[Message] | None = None
    assignments: list[Message] | None = None
    changed_clusters: list[int] = []
    changed_assignments: list[int] = []
    for name in changed:
        entries = where.get(name)
        if not entries:
            continue
        eds = uses_eds_of(mesh, name, memo)
        for cpos, epos, target in entries:
            if (epos is not None) != eds:
                return None
            if epos is not None:
                # The EDS cluster itself depends on the service's policy only: unchanged.
                if assignments is None:
                    assignments = list(last.out[typeurls.ENDPOINT])
                assignments[epos] = assignment_of(mesh, target, group.zone, memo)
                changed_assignments.append(epos)
            else:  # STRICT_DNS: the endpoints are inside the cluster
                if clusters is None:
                    clusters = list(last.out[typeurls.CLUSTER])
                clusters[cpos] = service_cluster_of(mesh, target, group, last.own_id, memo)
                changed_clusters.append(cpos)
    out = last.out
    if clusters is not None or assignments is not None:
        out = dict(out)
        if clusters is not None:
            out[typeurls.CLUSTER] = Patched(clusters, last.out[typeurls.CLUSTER], changed_clusters)
        if assignments is not None:
            out[typeurls.ENDPOINT] = Patched(assignments, last.out[typeurls.ENDPOINT], changed_assignments)
    return Generated(mesh, last.credentials, out, last.offset, last.targets, last.own_id, where)
