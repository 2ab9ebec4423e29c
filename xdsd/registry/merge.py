"""Registered instances join their service's endpoints: the mesh the generators see is the file's
mesh plus the live registrations."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xdsd.errors import FieldError
from xdsd.model import Endpoint, Mesh, Service
from xdsd.registry.instance import Instance, RegistrationInput, address_key


def merge(mesh: Mesh, instances: Iterable[Instance]) -> Mesh:
    return Merger().merge(mesh, instances)


Key = tuple[object, ...]  # what an instance contributes to its service's endpoints (_serving)
_INSTANCE_ID = operator.attrgetter("instance_id")


@dataclass(slots=True)
class _Merged:
    """One service's last merge: its file object, its instances (by id) and their keys, the
    endpoints made for them, and the merged service."""

    service: Service
    instances: list[Instance]
    keys: tuple[Key, ...]
    endpoints: dict[Key, Endpoint]
    merged: Service


class Merger:
    """Merges, remembering each service's last result: a service whose static config and live
    instances did not change keeps its very object, so everything generated from it is reused.
    The cost of a merge is a pass over the instances plus work for the services that changed: a
    service whose instances are the very objects of the last merge is not looked at again, and
    of a service with new objects (a heartbeat makes one) only those are keyed again."""

    def __init__(self) -> None:
        self._last: dict[str, _Merged] = {}
        self._taken: dict[str, tuple[Service, set[tuple[str, int]]]] = {}  # static address:ports
        self._file: Mesh | None = None  # the file's mesh of the last merge, and its result
        self._out: Mesh | None = None
        # After a merge of the same file mesh as the last one: (the last result, the services whose
        # endpoints differ from it). Nothing else differs: the other services, the gateways and
        # the mesh settings are the very same objects. None after a new file mesh.
        self.endpoints_changed: tuple[Mesh, frozenset[str]] | None = None

    def merge(self, mesh: Mesh, instances: Iterable[Instance], file_changed: frozenset[str] | None = None) -> Mesh:
        """The file's ``mesh`` with the live ``instances``. ``file_changed``: ``mesh`` is a new file
        revision that differs from the last one merged only in these services' endpoints (the
        rest the very same objects: ``sources.intern``); the result is then a patchable change too."""
        by_service: dict[str, list[Instance]] = {}
        for inst in instances:
            if inst.service in mesh.services:  # a service dropped from the file takes its instances along
                by_service.setdefault(inst.service, []).append(inst)
        last, self._last = self._last, {}
        # Services that had instances and have none now are back to their file object.
        changed = {name for name in last if name not in by_service}
        result = mesh
        if by_service:
            services = dict(mesh.services)
            for name, insts in by_service.items():
                insts.sort(key=_INSTANCE_ID)
                merged, was_changed = self._merge_service(mesh, name, insts, last.get(name))
                if was_changed:
                    changed.add(name)
                self._last[name] = merged
                services[name] = merged.merged
            result = mesh.model_copy(update={"services": services})
        same_file = self._file is mesh and self._out is not None
        if self._out is not None and (same_file or file_changed is not None):
            self.endpoints_changed = (self._out, frozenset(changed | (file_changed or frozenset())))
        else:
            self.endpoints_changed = None
        self._file, self._out = mesh, result
        return result

    def _merge_service(self, mesh: Mesh, name: str, insts: list[Instance], previous: _Merged | None) -> tuple[_Merged, bool]:
        """This service's merge, and whether it differs from ``previous``."""
        service = mesh.services[name]
        if previous is None or previous.service is not service:
            keys = tuple(map(_serving, insts))
            return self._with_instances(mesh, name, insts, keys, previous.endpoints if previous else {}), True
        if len(insts) == len(previous.instances) and all(map(operator.is_, insts, previous.instances)):
            return previous, False
        keys = _keys(insts, previous)
        if keys == previous.keys:
            return _Merged(service, insts, keys, previous.endpoints, previous.merged), False
        return self._with_instances(mesh, name, insts, keys, previous.endpoints), True

    def _with_instances(self, mesh: Mesh, name: str, insts: list[Instance], keys: tuple[Key, ...],
                        known: dict[Key, Endpoint]) -> _Merged:
        static = mesh.endpoints_of(name)
        service = mesh.services[name]
        cached = self._taken.get(name)
        if cached is None or cached[0] is not service:
            cached = (service, {(address_key(e.address), e.port) for e in static})  # once per static config
        self._taken[name] = cached
        taken = cached[1]
        extra = []
        endpoints: dict[Key, Endpoint] = {}
        for i, k in zip(insts, keys, strict=True):
            if (address_key(i.address), i.port) in taken:
                continue
            ep = known.get(k)
            if ep is None:
                ep = Endpoint(
                    address=i.address, port=i.port, weight=i.weight, zone=i.zone, labels=dict(i.labels),
                    status="draining" if i.state == "DRAINING" else "healthy",
                )
            endpoints[k] = ep
            extra.append(ep)
        merged = service.model_copy(update={"endpoints": [*static, *extra]})
        return _Merged(service, insts, keys, endpoints, merged)


def _keys(insts: list[Instance], previous: _Merged) -> tuple[Key, ...]:
    """The keys of ``insts``, taking the previous key of an instance that is the very same object."""
    if len(insts) != len(previous.instances):
        return tuple(map(_serving, insts))
    return tuple(k if a is b else _serving(a) for a, b, k in zip(insts, previous.instances, previous.keys, strict=True))


def _serving(i: Instance) -> Key:
    return (i.instance_id, i.address, i.port, i.weight, i.zone, tuple(sorted(i.labels.items())), i.state)


def mesh_check(current: Callable[[], Mesh | None]) -> Callable[[RegistrationInput], list[FieldError]]:
    """Registration rules that need the mesh: the service is declared; a sidecar's instances register
    their inbound port; a static endpoint's address:port is not registered again. O(1): the
    static address:ports are indexed once per service object. (An address:port taken by another
    registered instance is the registry's own rule, scoped to the service.)"""

    static: dict[str, tuple[Service, set[tuple[str, int]]]] = {}

    def check(reg: RegistrationInput) -> list[FieldError]:
        mesh = current()
        if mesh is None:
            return [FieldError("service", "no mesh config is loaded yet")]
        service = mesh.services.get(reg.service)
        if service is None:
            return [FieldError("service", f"unknown service {reg.service!r}: declare it in the mesh config first")]
        errors: list[FieldError] = []
        if service.sidecar is not None and reg.port != service.sidecar.inbound.port:
            errors.append(FieldError("port", f"{reg.service} runs sidecars: register the inbound port {service.sidecar.inbound.port}"))
        taken = static.get(reg.service)
        if taken is None or taken[0] is not service:
            taken = static[reg.service] = (service, {(address_key(e.address), e.port) for e in service.endpoints})
        if (address_key(reg.address), reg.port) in taken[1]:
            errors.append(FieldError("address", f"{reg.address}:{reg.port} is a static endpoint of {reg.service} in the mesh config"))
        return errors

    return check
