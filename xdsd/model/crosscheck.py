"""Rules that span fields: references to services, names that must be unique, addresses that must
not collide. A reference to an unknown service is an error here, never an Envoy NACK later."""

from __future__ import annotations

import ipaddress
import re

from xdsd.errors import FieldError
from xdsd.model.mesh import Mesh, Policy, Retries, Service
from xdsd.model.telemetry import check_telemetry
from xdsd.model.traffic import LoadBalancer, Route


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
        errors.extend(_check_subsets(name, service))
        errors.extend(_check_load_balancer(f"services.{name}.load_balancer", service.load_balancer))
        cb = service.circuit_breakers
        if cb is not None and cb.retry_budget is not None and cb.max_retries is not None:
            errors.append(FieldError(f"services.{name}.circuit_breakers.retry_budget",
                                     "give max_retries or retry_budget, not both (Envoy ignores max_retries under a budget)"))
        if cb is not None and cb.retry_budget is not None and cb.retry_budget.percent <= 0:
            errors.append(FieldError(f"services.{name}.circuit_breakers.retry_budget.percent",
                                     f"must be above 0, got {cb.retry_budget.percent}"))
        errors.extend(_check_routes(mesh, f"services.{name}.routes", service.routes, owner=name))

    for name, policy in mesh.authorization.items():
        errors.extend(_check_policy(mesh, name, policy))
    errors.extend(check_telemetry(mesh))

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
        errors.extend(_check_routes(mesh, f"gateways.{gname}.routes", gateway.routes, owner=None))
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
    if name not in mesh.services and name not in mesh.gateways:
        errors.append(FieldError(path, f"unknown service or gateway {name!r}"))
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


def _check_subsets(name: str, service: Service) -> list[FieldError]:
    errors: list[FieldError] = []
    for subset, labels in service.subsets.items():
        path = f"services.{name}.subsets.{subset}"
        if not labels:
            errors.append(FieldError(path, "give the labels that select the subset's endpoints"))
        # Registered endpoints join later: only a service listing static endpoints can be checked.
        elif service.endpoints and not any(_selects(labels, ep.labels) for ep in service.endpoints):
            want = ", ".join(f"{k}={v}" for k, v in labels.items())
            errors.append(FieldError(path, f"no endpoint of {name!r} has the labels {want}"))
    return errors


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _check_load_balancer(path: str, lb: LoadBalancer | None) -> list[FieldError]:
    if lb is None:
        return []
    hashing = lb.policy in ("ring_hash", "maglev")
    if hashing and lb.hash_on is None:
        return [FieldError(f"{path}.hash_on", f"{lb.policy} needs a hash key: hash_on: {{header: NAME}} or {{cookie: NAME}}")]
    if not hashing and lb.hash_on is not None:
        return [FieldError(f"{path}.hash_on", f"only used with ring_hash or maglev, not {lb.policy}")]
    if lb.hash_on is not None and (lb.hash_on.header is None) == (lb.hash_on.cookie is None):
        return [FieldError(f"{path}.hash_on", "give exactly one of header or cookie")]
    return []


# RE2 (Envoy's regex engine) has no lookaround and no backreferences.
_NOT_RE2 = re.compile(r"\\(?:[1-9]|k<)|\(\?<?[=!]")


def _check_regex(value: str) -> str | None:
    if _NOT_RE2.search(value):
        return "lookaround and backreferences are not supported (RE2 syntax)"
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


def _match_key(route: Route) -> tuple[object, ...]:
    return (route.prefix, route.path, route.regex, tuple(sorted(m.upper() for m in route.methods)),
            tuple(sorted(route.headers.items())))


def _check_routes(mesh: Mesh, path: str, routes: list[Route], owner: str | None) -> list[FieldError]:
    """Gateway routes (``owner`` None) or a service's own routes (targets: the owner's subsets)."""
    errors: list[FieldError] = []
    seen: dict[tuple[object, ...], int] = {}
    for i, route in enumerate(routes):
        rpath = f"{path}[{i}]"
        errors.extend(_check_retries(f"{rpath}.retries", route.retries))
        kinds = [k for k in ("prefix", "path", "regex") if getattr(route, k) is not None]
        if len(kinds) != 1:
            errors.append(FieldError(rpath, "give exactly one of prefix, path (exact) or regex"))
        if route.regex is not None and (problem := _check_regex(route.regex)):
            errors.append(FieldError(f"{rpath}.regex", problem))
        for j, method in enumerate(route.methods):
            if method.upper() not in _METHODS:
                errors.append(FieldError(f"{rpath}.methods[{j}]", f"unknown HTTP method {method!r}"))
        if route.split and (route.service is not None or route.subset is not None):
            errors.append(FieldError(f"{rpath}.split", "give either service (and subset) or split, not both"))
        elif not route.split and route.service is None and owner is None:
            errors.append(FieldError(rpath, "give a service (optionally with a subset) or a split"))
        if owner is not None and route.service is not None and route.service != owner:
            errors.append(FieldError(f"{rpath}.service", f"a service's routes send to {owner!r} (and its subsets) only"))
        else:
            errors.extend(_check_destination(mesh, rpath, route.service or owner, route.subset))
        if route.split:
            total = sum(d.weight for d in route.split)
            if total != 100:
                errors.append(FieldError(f"{rpath}.split", f"weights must add up to 100, got {total}"))
            targets: dict[tuple[str | None, str | None], int] = {}
            for j, d in enumerate(route.split):
                dpath = f"{rpath}.split[{j}]"
                service = d.service or owner
                if service is None:
                    errors.append(FieldError(f"{dpath}.service", "missing"))
                elif owner is not None and service != owner:
                    errors.append(FieldError(f"{dpath}.service", f"a service's routes send to {owner!r} (and its subsets) only"))
                else:
                    errors.extend(_check_destination(mesh, dpath, service, d.subset))
                if (service, d.subset) in targets:
                    errors.append(FieldError(dpath, f"same destination as split[{targets[(service, d.subset)]}]"))
                targets.setdefault((service, d.subset), j)
        if route.mirror is not None:
            mpath = f"{rpath}.mirror"
            if route.mirror.service is None and owner is None:
                errors.append(FieldError(f"{mpath}.service", "missing"))
            elif owner is not None and route.mirror.service not in (None, owner):
                errors.append(FieldError(f"{mpath}.service", f"a service's routes send to {owner!r} (and its subsets) only"))
            else:
                errors.extend(_check_destination(mesh, mpath, route.mirror.service or owner, route.mirror.subset))
        if route.rewrite is not None:
            if route.rewrite.prefix is None and route.rewrite.host is None:
                errors.append(FieldError(f"{rpath}.rewrite", "give prefix and/or host"))
            if route.rewrite.prefix is not None and route.regex is not None:
                errors.append(FieldError(f"{rpath}.rewrite.prefix", "needs a prefix or exact path match, not regex"))
        if route.fault is not None and route.fault.delay is None and route.fault.abort is None:
            errors.append(FieldError(f"{rpath}.fault", "give delay and/or abort"))
        key = _match_key(route)
        if key in seen and route.prefix is not None and not route.methods and not route.headers:
            errors.append(FieldError(f"{rpath}.prefix", f"duplicate prefix {route.prefix!r} (same as routes[{seen[key]}]); "
                                     "it could never match"))
        elif key in seen:
            errors.append(FieldError(rpath, f"same match as routes[{seen[key]}]; it could never match"))
        else:
            seen[key] = i
    return errors


def _check_destination(mesh: Mesh, path: str, service: str | None, subset: str | None) -> list[FieldError]:
    if service is None:
        return [FieldError(f"{path}.subset", "a subset needs a service")] if subset is not None else []
    if service not in mesh.services:
        return [FieldError(f"{path}.service", f"unknown service {service!r}")]
    if subset is not None and subset not in mesh.services[service].subsets:
        known = ", ".join(sorted(mesh.services[service].subsets)) or "none"
        return [FieldError(f"{path}.subset", f"unknown subset {subset!r} of {service!r} (known: {known})")]
    return []
