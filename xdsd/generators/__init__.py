"""Pure generators: ``(Mesh, NodeGroup, Credentials) -> resources``, one module per resource type,
no I/O. Which node gets what is decided here."""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.ca import Credentials, gateway_id, service_id
from xdsd.generators import clusters, endpoints, listeners, routes, secrets, telemetry
from xdsd.generators.memo import Memo, NoMemo, Patched
from xdsd.generators.node import NodeGroup, Transport
from xdsd.generators.roles import GATEWAY, SIDECAR, role_of
from xdsd.model import Mesh, Service
from xdsd.model.traffic import Route

__all__ = ["Memo", "NodeGroup", "Transport", "generate", "required_identities"]

_NO_CREDENTIALS = Credentials()
_NO_MEMO = NoMemo()


def required_identities(mesh: Mesh) -> set[str]:
    """Every SPIFFE ID the CA must hold an SVID for: services with sidecars, and gateways that call
    them over mTLS."""
    td = mesh.mesh.trust_domain
    ids = {service_id(td, name) for name, svc in mesh.services.items() if svc.sidecar is not None}
    for name, gw in mesh.gateways.items():
        if any(mesh.services[s].sidecar is not None for r in gw.routes for s, _ in r.destinations()):
            ids.add(gateway_id(td, name))
    return ids


def generate(mesh: Mesh, group: NodeGroup, credentials: Credentials = _NO_CREDENTIALS,
             memo: Memo = _NO_MEMO) -> dict[str, list[Message]]:
    """Every resource a node of ``group`` should hold, by type URL. With a ``memo``, per-service
    resources are built once per revision for all groups, and kept while their service is unchanged.

    When the memo says that only some services' endpoints changed since the mesh of its last
    output for ``group`` (``memo.endpoints_changed``), that output is patched: the assignments
    (and STRICT_DNS clusters) of those services are rebuilt, the rest is the same list objects.
    The result equals a full generation (tested); the work is O(changed services), not O(clusters)."""
    key = ("generated", group)
    change = memo.endpoints_changed
    if change is not None:
        last = memo.last(key)
        if isinstance(last, _Generated) and last.mesh is change[0] and last.credentials is credentials:
            patched = _patch(mesh, group, last, change[1], memo)
            if patched is not None:
                memo.keep(key, patched)
                return patched.out
    out: dict[str, list[Message]] = {t: [] for t in typeurls.PUSH_ORDER}
    role = role_of(mesh, group.cluster)
    layout: _Layout = (0, [], None)
    if role == GATEWAY:
        layout = _gateway(mesh, group, credentials, out, memo)
    elif role == SIDECAR and mesh.services[group.cluster].sidecar is not None:
        layout = _sidecar(mesh, group, credentials, out, memo)
    telemetry.extend(mesh, group, out, memo)  # stats listener, access logs, tracing (mesh.telemetry)
    memo.keep(key, _Generated(mesh, credentials, out, *layout))
    return out


# Where a group's service clusters sit: (offset of the first in the CLUSTER list, the targets in
# that order, the identity the clusters' TLS presents). ENDPOINT holds the EDS ones' assignments.
_Layout = tuple[int, list["Target"], str | None]


@dataclass(slots=True)
class _Generated:
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


def _where(last: _Generated) -> dict[str, list[tuple[int, int | None, Target]]] | _SortedTargets | None:
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
        if j < len(assignments) and _assignment_name(assignments[j]) == endpoints.cluster_name(*target):
            epos = j
            j += 1
        where.setdefault(target[0], []).append((last.offset + i, epos, target))
    return where if j == len(assignments) else None


_SERVICE = operator.itemgetter(0)


class _SortedTargets:
    """Where services feed when every target is EDS and the targets are sorted by service (as
    generators build them): a service's targets are one slice, found by bisection. A mapping
    with 10,000 entries cost ~6 ms (and a garbage collection) at the first patch."""

    __slots__ = ("offset", "targets")

    def __init__(self, targets: list[Target], offset: int) -> None:
        self.targets = targets
        self.offset = offset

    def get(self, name: str) -> list[tuple[int, int | None, Target]] | None:
        lo = bisect.bisect_left(self.targets, name, key=_SERVICE)
        hi = bisect.bisect_right(self.targets, name, lo=lo, key=_SERVICE)
        return [(self.offset + i, i, self.targets[i]) for i in range(lo, hi)] or None


def _assignment_name(message: Message) -> str:
    return message.name if isinstance(message, endpoints.Encoded) else message.cluster_name  # type: ignore[attr-defined,no-any-return]


def _patch(mesh: Mesh, group: NodeGroup, last: _Generated, changed: frozenset[str], memo: Memo) -> _Generated | None:
    """``last`` with what ``changed`` services feed rebuilt; None if that moves anything (a service
    switching between EDS and STRICT_DNS adds or drops an assignment): then generate in full."""
    where = last.where if last.where is not None else _where(last)
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
        eds = _uses_eds(mesh, name, memo)
        for cpos, epos, target in entries:
            if (epos is not None) != eds:
                return None
            if epos is not None:
                # The EDS cluster itself depends on the service's policy only: unchanged.
                if assignments is None:
                    assignments = list(last.out[typeurls.ENDPOINT])
                assignments[epos] = _assignment(mesh, target, group.zone, memo)
                changed_assignments.append(epos)
            else:  # STRICT_DNS: the endpoints are inside the cluster
                if clusters is None:
                    clusters = list(last.out[typeurls.CLUSTER])
                clusters[cpos] = _service_cluster(mesh, target, group, last.own_id, memo)
                changed_clusters.append(cpos)
    out = last.out
    if clusters is not None or assignments is not None:
        out = dict(out)
        if clusters is not None:
            out[typeurls.CLUSTER] = Patched(clusters, last.out[typeurls.CLUSTER], changed_clusters)
        if assignments is not None:
            out[typeurls.ENDPOINT] = Patched(assignments, last.out[typeurls.ENDPOINT], changed_assignments)
    return _Generated(mesh, last.credentials, out, last.offset, last.targets, last.own_id, where)


def _transport(group: NodeGroup) -> tuple[object, ...]:
    """What of the group a per-service resource depends on (its config sources)."""
    return (group.transport, group.xds_cluster, group.initial_metadata)


Target = tuple[str, str | None]  # (service, subset): one cluster


def _targets(mesh: Mesh, routes: list[Route], default_service: str | None = None) -> list[Target]:
    """The clusters ``routes`` send to (subsets, split arms and mirrors included), sorted."""
    found = {t for r in routes for t in r.destinations(default_service)}
    if default_service is not None:
        found.add((default_service, None))
    return sorted(found, key=lambda t: (t[0], t[1] or ""))


R = TypeVar("R")


def _each(mesh: Mesh, memo: Memo, key: Hashable, targets: list[Target], fn: Callable[[Target], R],
          services: list[Service] | None = None) -> list[R]:
    """``[fn(t) for t in targets]``, where a target whose service is the very object it was last
    revision reuses its last result: a change to one of 5,000 services costs 5,000 identity checks,
    not 5,000 generator calls. ``fn`` must depend on the target's service (and fixed inputs) only.
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


def _service_cluster(mesh: Mesh, target: Target, group: NodeGroup, own_id: str | None, memo: Memo) -> Message:
    name, subset = target
    service = mesh.services[name]
    eds = _uses_eds(mesh, name, memo)
    # An EDS cluster does not carry its endpoints: an endpoint change must not rebuild it for every
    # caller (its TLS context names the caller's own certificate, so there is one per caller).
    # A STRICT_DNS one does, with priorities by the node's zone.
    inputs = (mesh.mesh,) if eds else (service, mesh.mesh)
    zone = None if eds else group.zone
    return memo.get(("cds", name, subset, _transport(group), own_id, eds, zone), inputs,
                    lambda: clusters.service_cluster(mesh, name, group, own_id, subset),
                    equal=_policy_of(mesh, name, memo) if eds else None)


def _policy(service: Service) -> tuple[object, ...]:
    """A service's fields except its endpoints: what its routes, listeners and EDS cluster depend on."""
    return tuple(v for k, v in service if k != "endpoints")


def _policy_of(mesh: Mesh, name: str, memo: Memo) -> tuple[object, ...]:
    """``_policy`` of a service, computed once per service object. After an endpoint change it is a
    new tuple of the very same members, so it compares equal at the cost of identity checks."""
    service = mesh.services[name]
    return memo.get(("policy", name), (service,), lambda: _policy(service))


def _uses_eds(mesh: Mesh, name: str, memo: Memo) -> bool:
    service = mesh.services[name]
    if memo.assignments is not None and len(service.endpoints) >= endpoints.LARGE:
        enc = memo.assignments  # large services: decided incrementally, chunk by chunk
        return memo.get(("eds?", name), (service,), lambda: enc.uses_eds(name, endpoints.endpoints_of(mesh, name), frozen=True))
    return memo.get(("eds?", name), (service,), lambda: endpoints.uses_eds(mesh.endpoints_of(name)))


def _assignment(mesh: Mesh, target: Target, zone: str | None, memo: Memo) -> Message | None:
    name, subset = target
    return memo.get(("eds", name, subset, zone), (mesh.services[name],),
                    lambda: endpoints.service_assignment(
                        mesh, name, subset, zone, memo.assignments, _uses_eds(mesh, name, memo)))


def _service_endpoints(mesh: Mesh, targets: list[Target], zone: str | None, memo: Memo,
                       key: Hashable = None, services: list[Service] | None = None) -> list[Message]:
    def one(target: Target) -> Message | None:
        return _assignment(mesh, target, zone, memo)

    found = _each(mesh, memo, ("eds-of", key, zone), targets, one, services) if key is not None else [one(t) for t in targets]
    return [cla for cla in found if cla is not None]  # None: a STRICT_DNS cluster, endpoints inline


def _policies(mesh: Mesh, names: set[str] | list[Target], memo: Memo, key: Hashable = None) -> tuple[tuple[object, ...], ...]:
    """The policies of services ``names`` (or of the already sorted, distinct ``(name, None)`` targets)."""
    targets: list[Target] = names if isinstance(names, list) else [(s, None) for s in sorted(names)]
    if key is None:
        return tuple(_policy_of(mesh, s, memo) for s, _ in targets)
    return tuple(_each(mesh, memo, ("policies-of", key), targets, lambda t: _policy_of(mesh, t[0], memo)))


def _gateway(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]], memo: Memo) -> _Layout:
    gateway = mesh.gateways[group.cluster]
    targets = memo.get(("gw-targets", group.cluster), (gateway,), lambda: _targets(mesh, list(gateway.routes)))
    # The gateway has an identity when it calls a service with sidecars (as in required_identities).
    own_id: str | None = gateway_id(mesh.mesh.trust_domain, group.cluster)
    if not any(mesh.services[s].sidecar is not None for s, _ in targets):
        own_id = None
    services = [mesh.services[name] for name, _ in targets]
    out[typeurls.CLUSTER] = _each(mesh, memo, ("cds-of", group, own_id), targets,
                                  lambda t: _service_cluster(mesh, t, group, own_id, memo), services)
    out[typeurls.ENDPOINT] = _service_endpoints(mesh, targets, group.zone, memo, key=group.cluster, services=services)
    # Listener and routes depend on the gateway and the policies of the services it routes to.
    distinct = memo.get(("gw-services", group.cluster), (gateway,),
                        lambda: [(s, None) for s in sorted({s for s, _ in targets})])
    policies = _policies(mesh, distinct, memo, key=group.cluster)
    # A gateway with a policy asks ext_authz (sending the headers its rules match on).
    policy = mesh.authorization.get(group.cluster)
    authz = None if policy is None else listeners.policy_headers(policy)
    out[typeurls.LISTENER] = [memo.get(("gw-lds", group, authz), (gateway,),
                                       lambda: listeners.gateway_listener(group.cluster, gateway, group, authz))]
    out[typeurls.ROUTE] = [memo.get(("gw-rds", group.cluster, authz is not None), (gateway, mesh.mesh),
                                    lambda: routes.gateway_routes(group.cluster, gateway, mesh), equal=policies)]
    if own_id is not None:
        out[typeurls.SECRET] = _secrets(credentials, own_id, memo)
    return 0, targets, own_id


def _sidecar(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]], memo: Memo) -> _Layout:
    name = group.cluster
    service = mesh.services[name]
    sidecar = service.sidecar
    assert sidecar is not None
    td = mesh.mesh.trust_domain
    own_id = service_id(td, name)
    upstreams = sorted(sidecar.upstreams)
    app_cluster = f"inbound|{sidecar.app_port}|{name}"
    local_cluster, own_listeners = memo.get(
        ("sidecar", group, own_id), (mesh.mesh,),
        lambda: _sidecar_own(name, service, group, own_id, td, app_cluster, upstreams,
                             listeners.policy_headers(mesh.authorization.get(name))),
        equal=_policy_of(mesh, name, memo),
    )
    # Each upstream's clusters: the whole service and the subsets its own routes send to.
    targets = [t for u in upstreams for t in _targets(mesh, mesh.services[u].routes, default_service=u)]
    out[typeurls.CLUSTER] = [local_cluster, *(_service_cluster(mesh, t, group, own_id, memo) for t in targets)]
    out[typeurls.ENDPOINT] = _service_endpoints(mesh, targets, group.zone, memo)
    out[typeurls.LISTENER] = list(own_listeners)
    out[typeurls.ROUTE] = [
        memo.get(("rds-out", u), (mesh.mesh,), lambda u=u: routes.outbound_routes(u, mesh),  # type: ignore[misc]
                 equal=_policies(mesh, {u, *(s for s, _ in _targets(mesh, mesh.services[u].routes, u))}, memo))
        for u in upstreams
    ]
    out[typeurls.SECRET] = _secrets(credentials, own_id, memo)
    return 1, targets, own_id  # after the local app cluster


def _sidecar_own(name: str, service: Service, group: NodeGroup, own_id: str, td: str, app_cluster: str,
                 upstreams: list[str], authz_headers: tuple[str, ...]) -> tuple[Message, tuple[Message, ...]]:
    """What a sidecar holds for its own service: the local app cluster, its inbound listener and
    one outbound listener per upstream. Depends on its own service (and the group) only."""
    sidecar = service.sidecar
    assert sidecar is not None
    local = clusters.local_app_cluster(app_cluster, group.app_address or sidecar.app_address, sidecar.app_port, service.protocol)
    inbound_address = group.inbound_address or sidecar.inbound.address
    own_listeners = (
        listeners.inbound_listener(name, inbound_address, sidecar.inbound.port,
                                   routes.inbound_routes(name, app_cluster), group, own_id, td, authz_headers),
        *(
            listeners.outbound_listener(u, sidecar.upstreams[u], routes.outbound_route_name(u), group)
            for u in upstreams
        ),
    )
    return local, own_listeners


def _secrets(credentials: Credentials, own_id: str, memo: Memo) -> list[Message]:
    svid = credentials.svids.get(own_id)
    return memo.get(("sds", own_id), (svid, credentials.bundle_pem), lambda: secrets.generate(credentials, own_id))
