"""Registered instances join their service's endpoints: the mesh the generators see is the file's
mesh plus the live registrations."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from xdsd.errors import FieldError
from xdsd.model import Endpoint, Mesh, Service
from xdsd.registry.instance import Instance, RegistrationInput


def merge(mesh: Mesh, instances: Iterable[Instance]) -> Mesh:
    return Merger().merge(mesh, instances)


class Merger:
    """Merges, remembering each service's last result: a service whose static config and live
    instances did not change keeps its very object, so everything generated from it is reused."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[Service, tuple[tuple[object, ...], ...], Service]] = {}
        self._endpoints: dict[tuple[object, ...], Endpoint] = {}
        self._taken: dict[str, tuple[Service, set[tuple[str, int]]]] = {}  # static address:ports
        self._file: Mesh | None = None  # the file's mesh of the last merge, and its result
        self._out: Mesh | None = None
        # After a merge of the same file mesh as the last one: (the last result, the services whose
        # endpoints differ from it). Nothing else differs: the other services, the gateways and
        # the mesh settings are the very same objects. None after a new file mesh.
        self.endpoints_changed: tuple[Mesh, frozenset[str]] | None = None

    def merge(self, mesh: Mesh, instances: Iterable[Instance]) -> Mesh:
        by_service: dict[str, list[Instance]] = {}
        for inst in instances:
            if inst.service in mesh.services:  # a service dropped from the file takes its instances along
                by_service.setdefault(inst.service, []).append(inst)
        last, self._last = self._last, {}
        known, self._endpoints = self._endpoints, {}
        # Services that had instances and have none now are back to their file object.
        changed = {name for name in last if name not in by_service}
        result = mesh
        if by_service:
            services = dict(mesh.services)
            for name, insts in by_service.items():
                service = services[name]
                insts.sort(key=lambda i: i.instance_id)
                key = tuple(_serving(i) for i in insts)
                previous = last.get(name)
                if previous is not None and previous[0] is service and previous[1] == key:
                    merged = previous[2]
                    self._endpoints.update((k, known[k]) for k in key if k in known)
                else:
                    merged = self._with_instances(mesh, name, insts, key, known)
                    changed.add(name)
                self._last[name] = (service, key, merged)
                services[name] = merged
            result = mesh.model_copy(update={"services": services})
        same_file = self._file is mesh and self._out is not None
        self.endpoints_changed = (self._out, frozenset(changed)) if same_file and self._out is not None else None
        self._file, self._out = mesh, result
        return result

    def _with_instances(self, mesh: Mesh, name: str, insts: list[Instance], keys: tuple[tuple[object, ...], ...],
                        known: dict[tuple[object, ...], Endpoint]) -> Service:
        static = mesh.endpoints_of(name)
        service = mesh.services[name]
        cached = self._taken.get(name)
        if cached is None or cached[0] is not service:
            cached = (service, {(e.address, e.port) for e in static})  # once per static config
        self._taken[name] = cached
        taken = cached[1]
        extra = []
        for i, k in zip(insts, keys, strict=True):
            if (i.address, i.port) in taken:
                continue
            ep = known.get(k)
            if ep is None:
                ep = Endpoint(
                    address=i.address, port=i.port, weight=i.weight, zone=i.zone, labels=dict(i.labels),
                    status="draining" if i.state == "DRAINING" else "healthy",
                )
            self._endpoints[k] = ep
            extra.append(ep)
        return mesh.services[name].model_copy(update={"endpoints": [*static, *extra]})


def _serving(i: Instance) -> tuple[object, ...]:
    return (i.instance_id, i.address, i.port, i.weight, i.zone, tuple(sorted(i.labels.items())), i.state)


def mesh_check(current: Callable[[], Mesh | None]) -> Callable[[RegistrationInput, dict[tuple[str, str], Instance]], list[FieldError]]:
    """Registration rules that need the mesh: the service is declared; a sidecar's instances register
    their inbound port; an address:port belongs to one instance."""

    static: dict[str, tuple[Service, set[tuple[str, int]]]] = {}  # address:ports, once per service object

    def check(reg: RegistrationInput, instances: dict[tuple[str, str], Instance]) -> list[FieldError]:
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
            taken = static[reg.service] = (service, {(e.address, e.port) for e in service.endpoints})
        if (reg.address, reg.port) in taken[1]:
            errors.append(FieldError("address", f"{reg.address}:{reg.port} is a static endpoint of {reg.service} in the mesh config"))
        for other in instances.values():
            if (other.address, other.port) == (reg.address, reg.port) and other.key != (reg.service, reg.instance_id):
                errors.append(FieldError("address", f"{reg.address}:{reg.port} is already registered as {other.service}/{other.instance_id}"))
        return errors

    return check
