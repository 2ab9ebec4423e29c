"""Reuse across node groups and revisions: per-service resources built once per revision for every
group that holds them (``Memo``), and the one decision per service of whether it is served over EDS
or as a STRICT_DNS cluster (``uses_eds_of``), passed to every generator that needs it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from google.protobuf.message import Message

from xdsd.generators import clusters, endpoints
from xdsd.generators.memo import Memo
from xdsd.model import Mesh, Service
from xdsd.model.traffic import Route
from xdsd.node import NodeGroup


def fetch_key(group: NodeGroup) -> tuple[object, ...]:
    """What of the group a per-service resource depends on (its config sources)."""
    return (group.transport, group.xds_cluster, group.initial_metadata)


Target = tuple[str, str | None]  # (service, subset): one cluster


def targets_of(mesh: Mesh, routes: list[Route], default_service: str | None = None) -> list[Target]:
    """The clusters ``routes`` send to (subsets, split arms and mirrors included), sorted."""
    found = {t for r in routes for t in r.destinations(default_service)}
    if default_service is not None:
        found.add((default_service, None))
    return sorted(found, key=lambda t: (t[0], t[1] or ""))


R = TypeVar("R")


def each(mesh: Mesh, memo: Memo, key: Hashable, targets: list[Target], fn: Callable[[Target], R],
          services: list[Service] | None = None) -> list[R]:
    """``[fn(t) for t in targets]``, where a target whose service is the very object it was last
    revision reuses its last result: a change to one service costs an identity check per target,
    not a generator call per target. ``fn`` must depend on the target's service (and fixed inputs) only.
    ``services``: the targets' Service objects, if the caller has them already."""
    if services is None:
        services = [mesh.services[name] for name, _ in targets]
    last = memo.last(key)
    if isinstance(last, tuple) and (last[0] is targets or last[0] == targets) and last[1] is mesh.mesh:
        results = [
            old if service is old_service else fn(t)
            for t, service, old_service, old in zip(targets, services, last[2], last[3], strict=True)
        ]
    else:
        results = [fn(t) for t in targets]
    memo.keep(key, (targets, mesh.mesh, services, results))
    return results


def service_cluster_of(mesh: Mesh, target: Target, group: NodeGroup, own_id: str | None, memo: Memo) -> Message:
    name, subset = target
    service = mesh.services[name]
    eds = uses_eds_of(mesh, name, memo)
    # An EDS cluster does not carry its endpoints: an endpoint change must not rebuild it for every
    # caller (its TLS context names the caller's own certificate, so there is one per caller).
    # A STRICT_DNS one does, with priorities by the node's zone.
    inputs = (mesh.mesh,) if eds else (service, mesh.mesh)
    zone = None if eds else group.zone
    return memo.get(("cds", name, subset, fetch_key(group), own_id, eds, zone), inputs,
                    lambda: clusters.service_cluster(mesh, name, group, own_id, subset, eds=eds),
                    equal=policy_of(mesh, name, memo) if eds else None)


def _policy(service: Service) -> tuple[object, ...]:
    """A service's fields except its endpoints: what its routes, listeners and EDS cluster depend on."""
    return tuple(v for k, v in service if k != "endpoints")


def policy_of(mesh: Mesh, name: str, memo: Memo) -> tuple[object, ...]:
    """``_policy`` of a service, computed once per service object. After an endpoint change it is a
    new tuple of the very same members, so it compares equal at the cost of identity checks."""
    service = mesh.services[name]
    return memo.get(("policy", name), (service,), lambda: _policy(service))


def uses_eds_of(mesh: Mesh, name: str, memo: Memo) -> bool:
    service = mesh.services[name]
    if memo.assignments is not None and len(service.endpoints) >= endpoints.LARGE:
        enc = memo.assignments  # large services: decided incrementally, chunk by chunk
        return memo.get(("eds?", name), (service,), lambda: enc.uses_eds(name, endpoints.endpoints_of(mesh, name), frozen=True))
    return memo.get(("eds?", name), (service,), lambda: endpoints.uses_eds(mesh.endpoints_of(name)))


def assignment_of(mesh: Mesh, target: Target, zone: str | None, memo: Memo) -> Message | None:
    name, subset = target
    return memo.get(("eds", name, subset, zone), (mesh.services[name],),
                    lambda: endpoints.service_assignment(
                        mesh, name, subset, zone, memo.assignments, eds=uses_eds_of(mesh, name, memo)))


def service_endpoints(mesh: Mesh, targets: list[Target], zone: str | None, memo: Memo,
                       key: Hashable = None, services: list[Service] | None = None) -> list[Message]:
    def one(target: Target) -> Message | None:
        return assignment_of(mesh, target, zone, memo)

    found = each(mesh, memo, ("eds-of", key, zone), targets, one, services) if key is not None else [one(t) for t in targets]
    return [cla for cla in found if cla is not None]  # None: a STRICT_DNS cluster, endpoints inline


def policies_of(mesh: Mesh, names: set[str] | list[Target], memo: Memo, key: Hashable = None) -> tuple[tuple[object, ...], ...]:
    """The policies of services ``names`` (or of the already sorted, distinct ``(name, None)`` targets)."""
    targets: list[Target] = names if isinstance(names, list) else [(s, None) for s in sorted(names)]
    if key is None:
        return tuple(policy_of(mesh, s, memo) for s, _ in targets)
    return tuple(each(mesh, memo, ("policies-of", key), targets, lambda t: policy_of(mesh, t[0], memo)))
