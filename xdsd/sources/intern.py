"""A new file revision shares every unchanged part with the last one.

Each load of the mesh file builds new model objects, equal or not to the last revision's. The
generators reuse what they built from the very same objects (identity), so a revision is handed on
with each unchanged service, gateway, policy and endpoint replaced by the last revision's object:
an edit then costs work for what it changed, not for the whole mesh. And when it changed only some
services' endpoints, it is the same kind of change as a registration (``endpoints_only``), which
the generators patch instead of generating again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from xdsd.model import Endpoint, Mesh, Service

T = TypeVar("T")


def _same(old: Mapping[str, T], new: Mapping[str, T]) -> dict[str, T]:
    return {name: old[name] if name in old and old[name] == value else value for name, value in new.items()}


def _endpoints(old: list[Endpoint], new: list[Endpoint]) -> list[Endpoint]:
    """``new`` with each endpoint equal to one of ``old`` replaced by that very object."""
    by_key = {(e.address, e.port): e for e in old}
    out = []
    for e in new:
        previous = by_key.get((e.address, e.port))
        out.append(previous if previous is not None and previous == e else e)
    return out


def _service(old: Service | None, new: Service) -> Service:
    if old is None:
        return new
    if old == new:
        return old
    endpoints = _endpoints(old.endpoints, new.endpoints)
    if _policy(old) == _policy(new):
        # Only the endpoints differ: everything else is the old objects (the generators compare the
        # service's policy by identity first).
        return old.model_copy(update={"endpoints": endpoints})
    return new.model_copy(update={"endpoints": endpoints})


def _policy(service: Service) -> dict[str, object]:
    return {k: v for k, v in service if k != "endpoints"}


def intern(previous: Mesh | None, mesh: Mesh) -> tuple[Mesh, frozenset[str] | None]:
    """``mesh`` sharing ``previous``'s unchanged objects, and the services whose endpoints alone
    changed if nothing else did (else None)."""
    if previous is None:
        return mesh, None
    services = {name: _service(previous.services.get(name), svc) for name, svc in mesh.services.items()}
    update: dict[str, object] = {
        "services": services,
        "gateways": _same(previous.gateways, mesh.gateways),
        "authorization": _same(previous.authorization, mesh.authorization),
        "mesh": previous.mesh if previous.mesh == mesh.mesh else mesh.mesh,
        "telemetry": previous.telemetry if previous.telemetry == mesh.telemetry else mesh.telemetry,
        "authentication": (previous.authentication if previous.authentication == mesh.authentication
                           else mesh.authentication),
    }
    shared = mesh.model_copy(update=update)
    same_shape = (
        services.keys() == previous.services.keys()
        and shared.gateways.keys() == previous.gateways.keys()
        and all(shared.gateways[n] is previous.gateways[n] for n in shared.gateways)
        and shared.authorization.keys() == previous.authorization.keys()
        and all(shared.authorization[n] is previous.authorization[n] for n in shared.authorization)
        and shared.mesh is previous.mesh and shared.telemetry is previous.telemetry
        and shared.authentication is previous.authentication
    )
    if not same_shape:
        return shared, None
    changed = {name for name, svc in services.items() if svc is not previous.services[name]}
    if any(_policy(services[name]) != _policy(previous.services[name]) for name in changed):
        return shared, None
    # A sidecar service without listed endpoints is served its inbound address: no difference there
    # unless the sidecar changed, which _policy covers.
    return shared, frozenset(changed)
