"""Rules that span fields: references to services, names that must be unique, addresses that must
not collide. A reference to an unknown service is an error here, never an Envoy NACK later."""

from __future__ import annotations

from xdsd.errors import FieldError
from xdsd.model.mesh import Mesh


def cross_check(mesh: Mesh) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, service in mesh.services.items():
        seen: dict[tuple[str, int], int] = {}
        for i, ep in enumerate(service.endpoints):
            key = (ep.address, ep.port)
            if key in seen:
                errors.append(
                    FieldError(
                        f"services.{name}.endpoints[{i}]",
                        f"duplicate endpoint {ep.address}:{ep.port} (same as endpoints[{seen[key]}])",
                    )
                )
            else:
                seen[key] = i

    listens: dict[tuple[str, int], str] = {}
    for gname, gateway in mesh.gateways.items():
        if gname in mesh.services:
            errors.append(
                FieldError(
                    f"gateways.{gname}",
                    f"name {gname!r} is also a service; node.cluster could not tell the two apart",
                )
            )
        key = (gateway.listen.address, gateway.listen.port)
        if key in listens:
            errors.append(
                FieldError(
                    f"gateways.{gname}.listen",
                    f"{key[0]}:{key[1]} is already the listen address of gateway {listens[key]!r}",
                )
            )
        else:
            listens[key] = gname
        prefixes: dict[str, int] = {}
        for i, route in enumerate(gateway.routes):
            if route.service not in mesh.services:
                errors.append(
                    FieldError(f"gateways.{gname}.routes[{i}].service", f"unknown service {route.service!r}")
                )
            if route.prefix in prefixes:
                errors.append(
                    FieldError(
                        f"gateways.{gname}.routes[{i}].prefix",
                        f"duplicate prefix {route.prefix!r} (same as routes[{prefixes[route.prefix]}]); "
                        "it could never match",
                    )
                )
            else:
                prefixes[route.prefix] = i
    return errors
