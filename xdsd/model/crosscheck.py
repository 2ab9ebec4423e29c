"""Rules that span fields: references to services, names that must be unique, addresses that must
not collide. A reference to an unknown service is an error here, never an Envoy NACK later."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

from xdsd.errors import FieldError
from xdsd.model.authentication import check_authentication, path_regex, requirement_path_problem
from xdsd.model.fields import reserved_name_problem
from xdsd.model.mesh import Mesh, Policy, Retries, Service
from xdsd.model.processing import check_processing
from xdsd.model.telemetry import check_telemetry
from xdsd.model.traffic import LoadBalancer, Route

try:  # the parser behind ``re.compile`` (``sre_parse`` before Python 3.11)
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

# An SVID lives between these (seconds): it is reissued at half its life, so a shorter one would
# keep the CA busy; the CA's root lives 10 years.
MIN_CERT_LIFETIME = 1.0
MAX_CERT_LIFETIME = 365 * 86400.0
# Envoy refuses a locality whose endpoints' load_balancing_weight add up past 2^32 - 1.
MAX_LOCALITY_WEIGHT = 2**32 - 1


def cross_check(mesh: Mesh) -> list[FieldError]:
    errors: list[FieldError] = []
    errors.extend(_check_reserved(mesh))
    lifetime = mesh.mesh.cert_lifetime
    if not MIN_CERT_LIFETIME <= lifetime <= MAX_CERT_LIFETIME:
        errors.append(FieldError("mesh.cert_lifetime", f"must be 1s..8760h (365 days), got {lifetime:g}s"))
    for name, service in mesh.services.items():
        errors.extend(_check_weights(name, service))
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
    errors.extend(check_processing(mesh))
    errors.extend(check_authentication(mesh))
    for name, req in mesh.authentication.require.items():
        for i, p in enumerate(req.paths):  # each becomes an RE2 regex in Envoy's jwt_authn rules
            if requirement_path_problem(p) is None and (problem := _check_regex(path_regex(p))) is not None:
                errors.append(FieldError(f"authentication.require.{name}.paths[{i}]",
                                         f"{p!r} is too long for Envoy's jwt_authn rules ({problem})"))

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


def _check_reserved(mesh: Mesh) -> list[FieldError]:
    """Services, gateways and subsets name Envoy resources (clusters, listeners, route
    configurations); names xdsd keeps for its own (``fields.RESERVED_PREFIX``) are refused."""
    errors: list[FieldError] = []
    for name, service in mesh.services.items():
        if problem := reserved_name_problem(name):
            errors.append(FieldError(f"services.{name}", problem))
        for subset in service.subsets:
            if problem := reserved_name_problem(subset):
                errors.append(FieldError(f"services.{name}.subsets.{subset}", problem))
    for name in mesh.gateways:
        if problem := reserved_name_problem(name):
            errors.append(FieldError(f"gateways.{name}", problem))
    return errors


def _check_weights(name: str, service: Service) -> list[FieldError]:
    """Envoy's limit on the weights of one locality (zone), for the service and each subset."""
    errors: list[FieldError] = []
    selectors: dict[str | None, dict[str, str]] = {None: {}, **service.subsets}
    for subset, selector in selectors.items():
        totals: dict[str, int] = {}
        for ep in service.endpoints:
            if all(ep.labels.get(k) == v for k, v in selector.items()):
                totals[ep.zone or ""] = totals.get(ep.zone or "", 0) + ep.weight
        for zone, total in totals.items():
            if total > MAX_LOCALITY_WEIGHT:
                where = f" of subset {subset!r}" if subset is not None else ""
                errors.append(FieldError(f"services.{name}.endpoints",
                                         f"the weights{where} in zone {zone!r} add up to {total}; Envoy allows at "
                                         f"most {MAX_LOCALITY_WEIGHT} per zone"))
        if errors:
            break
    return errors


@functools.lru_cache(maxsize=65536)  # the same addresses come back with every reload of the file
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
    # A leaf of pure functions: the rule paths are checked with the very reading requests get.
    from xdsd.authz.paths import rule_path_problem

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
            elif p != "*" and (problem := rule_path_problem(p)) is not None:
                errors.append(FieldError(f"{rpath}.{kind}.paths[{j}]", problem))
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


# Envoy compiles route regexes with RE2 and refuses a program of more than 100 instructions
# (runtime ``re2.max_program_size.error_level``, default 100) or a repetition count above 1000.
RE2_MAX_PROGRAM_SIZE = 100
RE2_MAX_REPEAT = 1000
MAX_REGEX_GROUP_DEPTH = 32
_RE2_OVERHEAD = 4  # instructions of any program (measured: 97 literals -> 101)
_LOOKAROUND = "lookaround and backreferences are not supported (RE2 syntax)"
# Python's re constructs RE2 refuses.
_NOT_RE2_OPS = {
    _sre.ASSERT: _LOOKAROUND, _sre.ASSERT_NOT: _LOOKAROUND, _sre.GROUPREF: _LOOKAROUND,
    _sre.GROUPREF_EXISTS: "conditional groups are not supported (RE2 syntax)",
    _sre.ATOMIC_GROUP: "atomic groups are not supported (RE2 syntax)",
    _sre.POSSESSIVE_REPEAT: "possessive repetition (*+, ++, ?+) is not supported (RE2 syntax)",
}
# Escapes Python's re reads and RE2 refuses (outside and inside [...]).
_NOT_RE2_ESCAPES = {"Z": "\\Z is not supported (RE2 syntax; use $)", "u": "\\u escapes are not supported (RE2 syntax)",
                    "U": "\\U escapes are not supported (RE2 syntax)", "N": "\\N{...} escapes are not supported (RE2 syntax)",
                    **{d: _LOOKAROUND for d in "123456789"}}
# Per-class costs measured on Envoy 1.40 (RE2, UTF-8): \d, \D, \w, \W, \s, \S.
_CATEGORY_COST = {
    _sre.CATEGORY_DIGIT: 1, _sre.CATEGORY_NOT_DIGIT: 2, _sre.CATEGORY_WORD: 3, _sre.CATEGORY_NOT_WORD: 5,
    _sre.CATEGORY_SPACE: 3, _sre.CATEGORY_NOT_SPACE: 4,
}
_PYTHON_ONLY_FLAGS = re.VERBOSE | re.ASCII | re.LOCALE
_FLAGS_MESSAGE = "only the flags i, m and s are supported (RE2 syntax)"
_GROUP_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def _check_regex(value: str) -> str | None:
    r"""Why Envoy (RE2) would refuse ``value`` as a route regex, or None. The pattern must be valid
    for Python's ``re`` too (so RE2-only syntax such as ``\p{L}`` or ``\Q...\E`` is refused), and
    its RE2 program size is estimated from the parsed pattern, from above (a pattern close to the
    limit may be refused although Envoy would take it)."""
    if not value:
        return "must not be empty"
    depth = deepest = 0
    i = 0
    while i < len(value):  # escapes, and nesting bounded before the (recursive) parser runs
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            if value[i + 1] in _NOT_RE2_ESCAPES:
                return _NOT_RE2_ESCAPES[value[i + 1]]
            i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    if deepest > MAX_REGEX_GROUP_DEPTH:
        return f"groups nested more than {MAX_REGEX_GROUP_DEPTH} deep"
    try:
        parsed = _sre_parse.parse(value)
        re.compile(value)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        return f"not a valid regular expression: {exc}"
    if parsed.state.flags & _PYTHON_ONLY_FLAGS:
        return _FLAGS_MESSAGE
    for name in parsed.state.groupdict:
        if not _GROUP_NAME_RE.fullmatch(name):
            return f"group name {name!r}: use letters, digits and '_' (RE2 syntax)"
    try:
        size = _RE2_OVERHEAD + _re2_cost(list(parsed), parsed.state.flags)
    except _NotRe2 as exc:
        return str(exc)
    if size > RE2_MAX_PROGRAM_SIZE:
        return (f"too complex for Envoy: its RE2 program would have about {size} instructions, at most "
                f"{RE2_MAX_PROGRAM_SIZE} are allowed (shorten the pattern, or match a prefix or exact path)")
    return None


class _NotRe2(Exception):
    pass


def _re2_cost(items: list[tuple[Any, Any]], flags: int) -> int:
    """An estimate, from above, of the RE2 instructions a parsed Python pattern compiles to
    (each construct's cost measured on Envoy 1.40; e.g. ``b{2,5}`` is 2 + 3 x 2)."""
    total = 0
    for op, av in items:
        if op in _NOT_RE2_OPS:
            raise _NotRe2(_NOT_RE2_OPS[op])
        if op is _sre.LITERAL:
            total += len(chr(av).encode("utf-8", "surrogatepass"))
        elif op is _sre.NOT_LITERAL:
            total += 2 if av < 0x80 else 4
        elif op is _sre.ANY:
            total += 1 if flags & re.DOTALL else 2
        elif op is _sre.IN:
            total += _class_cost(av)
        elif op is _sre.AT:
            if av is _sre.AT_END_STRING:
                raise _NotRe2(_NOT_RE2_ESCAPES["Z"])
            total += 1
        elif op is _sre.CATEGORY:
            total += _CATEGORY_COST.get(av, 5)
        elif op is _sre.BRANCH:
            branches = av[1]
            total += sum(_re2_cost(list(b), flags) for b in branches) + len(branches) - 1
        elif op is _sre.SUBPATTERN:
            group, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & _PYTHON_ONLY_FLAGS:
                raise _NotRe2(_FLAGS_MESSAGE)
            total += _re2_cost(list(sub), (flags | add_flags) & ~del_flags) + (2 if group is not None else 0)
        elif op is _sre.MAX_REPEAT or op is _sre.MIN_REPEAT:
            lo, hi, sub = av
            if lo > RE2_MAX_REPEAT or (hi is not _sre.MAXREPEAT and hi > RE2_MAX_REPEAT):
                raise _NotRe2(f"a repetition count is at most {RE2_MAX_REPEAT} (RE2)")
            cost = _re2_cost(list(sub), flags)
            if hi is _sre.MAXREPEAT:
                total += max(lo, 1) * cost + 1
            else:
                total += lo * cost + (hi - lo) * (cost + 1)
        else:
            total += 5  # anything else: counted generously
        if total > 100 * RE2_MAX_PROGRAM_SIZE:
            return total  # far past the limit: the rest does not matter
    return total


def _class_cost(items: list[tuple[Any, Any]]) -> int:
    cost = 0
    for op, av in items:
        if op is _sre.NEGATE:
            cost += 1
        elif op is _sre.LITERAL:
            cost += 1 if av < 0x80 else 4
        elif op is _sre.RANGE:
            cost += 1 if av[1] < 0x80 else 4
        elif op is _sre.CATEGORY:
            cost += _CATEGORY_COST.get(av, 5)
        else:
            cost += 4
    return max(cost, 1)


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
