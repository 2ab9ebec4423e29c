"""Rules that span fields: references to services, names that must be unique, addresses that must
not collide. A reference to an unknown service is an error here, never an Envoy NACK later."""

from __future__ import annotations

import ipaddress

from xdsd.errors import FieldError
from xdsd.model.mesh import Mesh, Policy, Retries, Service


def cross_check(mesh: Mesh) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, service in mesh.services.items():
        seen: dict[tuple[str, int], int] = {}
        for i, ep in enumerate(service.endpoints):
            key = (_same_address(ep.address), ep.port)
            if key in seen:
                errors.append(
                    FieldError(
                        f"services.{name}.endpoints[{i}]",
                        f"duplicate endpoint {ep.address}:{ep.port} (same as endpoints[{seen[key]}])",
                    )
                )
            else:
                seen[key] = i

    for name, service in mesh.services.items():
        errors.extend(_check_sidecar(mesh, name, service))
        errors.extend(_check_retries(f"services.{name}.retries", service.retries))

    for name, policy in mesh.authorization.items():
        errors.extend(_check_policy(mesh, name, policy))

    listens: dict[tuple[str, int], str] = {}
    for gname, gateway in mesh.gateways.items():
        if gname in mesh.services:
            errors.append(
                FieldError(
                    f"gateways.{gname}",
                    f"name {gname!r} is also a service; node.cluster could not tell the two apart",
                )
            )
        key = (_same_address(gateway.listen.address), gateway.listen.port)
        if key in listens:
            errors.append(
                FieldError(
                    f"gateways.{gname}.listen",
                    f"{gateway.listen.address}:{key[1]} is already the listen address of gateway {listens[key]!r}",
                )
            )
        else:
            listens[key] = gname
        prefixes: dict[str, int] = {}
        for i, route in enumerate(gateway.routes):
            errors.extend(_check_retries(f"gateways.{gname}.routes[{i}].retries", route.retries))
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


def _same_address(address: str) -> str:
    """One spelling per address, so that ``::1`` and ``0::1`` (or ``Host.example.`` and
    ``host.example``) count as the same when looking for duplicates."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.lower().rstrip(".")


def _check_sidecar(mesh: Mesh, name: str, service: Service) -> list[FieldError]:
    sc = service.sidecar
    if sc is None:
        return []
    errors: list[FieldError] = []
    path = f"services.{name}.sidecar"
    for i, ep in enumerate(service.endpoints):
        if ep.port != sc.inbound.port:
            errors.append(
                FieldError(
                    f"services.{name}.endpoints[{i}].port",
                    f"a service with a sidecar is reached on its inbound port {sc.inbound.port}, got {ep.port}",
                )
            )
    local_ports: dict[int, str] = {}
    if sc.app_address in ("127.0.0.1", "0.0.0.0"):
        local_ports[sc.app_port] = "app_port"
    for upstream, port in sc.upstreams.items():
        if upstream not in mesh.services:
            errors.append(FieldError(f"{path}.upstreams.{upstream}", f"unknown service {upstream!r}"))
        elif upstream == name:
            errors.append(FieldError(f"{path}.upstreams.{upstream}", "a service cannot be its own upstream"))
        if port in local_ports:
            errors.append(
                FieldError(f"{path}.upstreams.{upstream}", f"port {port} on 127.0.0.1 is already {local_ports[port]}")
            )
        local_ports[port] = f"upstreams.{upstream}"
    if sc.inbound.address in ("127.0.0.1", "0.0.0.0") and sc.inbound.port in local_ports:
        errors.append(
            FieldError(f"{path}.inbound.port", f"port {sc.inbound.port} is already {local_ports[sc.inbound.port]}")
        )
    return errors


_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}


def _check_policy(mesh: Mesh, name: str, policy: Policy) -> list[FieldError]:
    errors: list[FieldError] = []
    path = f"authorization.{name}"
    if name not in mesh.services:
        errors.append(FieldError(path, f"unknown service {name!r}"))
    seen: dict[str, int] = {}
    for i, rule in enumerate(policy.rules):
        rpath = f"{path}.rules[{i}]"
        if rule.name in seen:
            errors.append(FieldError(f"{rpath}.name", f"duplicate rule name {rule.name!r} (same as rules[{seen[rule.name]}])"))
        seen.setdefault(rule.name, i)
        if (rule.allow is None) == (rule.deny is None):
            errors.append(FieldError(rpath, "a rule has exactly one of 'allow' or 'deny'"))
            continue
        kind = "allow" if rule.allow is not None else "deny"
        match = rule.allow or rule.deny
        assert match is not None
        for j, caller in enumerate(match.from_):
            if not caller.startswith("spiffe://") and caller not in mesh.services and caller not in mesh.gateways:
                errors.append(FieldError(f"{rpath}.{kind}.from[{j}]", f"unknown service {caller!r} (or give a spiffe:// principal)"))
        for j, method in enumerate(match.methods):
            if method.upper() not in _METHODS:
                errors.append(FieldError(f"{rpath}.{kind}.methods[{j}]", f"unknown HTTP method {method!r}"))
        for j, p in enumerate(match.paths):
            if p != "*" and (not p.startswith("/") or "*" in p[:-1]):
                errors.append(FieldError(f"{rpath}.{kind}.paths[{j}]", f"{p!r}: use an exact path, a prefix ending in '*', or '*'"))
    return errors


def _check_retries(path: str, retries: Retries | None) -> list[FieldError]:
    if retries is None:
        return []
    errors: list[FieldError] = []
    if retries.status_codes and "retriable-status-codes" not in retries.retry_on:
        errors.append(FieldError(f"{path}.status_codes", "only used when retry_on includes retriable-status-codes"))
    if "retriable-status-codes" in retries.retry_on and not retries.status_codes:
        errors.append(FieldError(f"{path}.status_codes", "give the codes to retry for retriable-status-codes"))
    b = retries.backoff
    if b is not None and b.max is not None and b.max < b.base:
        errors.append(FieldError(f"{path}.backoff.max", "must not be smaller than backoff.base"))
    return errors
