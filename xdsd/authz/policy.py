"""Policies compiled for fast evaluation, and the evaluation itself (pure, no I/O).

Semantics, per destination service:
1. Deny rules are checked first: the first matching one denies.
2. Then allow rules: the first matching one allows.
3. Otherwise the policy's ``default`` decides (``deny`` unless set).
Dry-run rules are evaluated too, but only reported: they never change the decision.
A service without a policy allows everything.

Paths are compared as the app will serve them (``xdsd.authz.paths``): rules and request paths are
both normalized, ``;params`` removed. When an app that knows no path parameters would read the path
otherwise (``/admin/..;/x``), the request must be allowed under both readings. An exact path in a
deny rule also denies it with or without a trailing ``/`` (apps commonly serve both alike); in an
allow rule it is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdsd.authz.paths import authz_path, literal_path
from xdsd.ca import gateway_id, service_id
from xdsd.model import Mesh
from xdsd.model.mesh import Match, Policy

# A verified JWT's payload (claims by name), or None when the request carries none.
Claims = Mapping[str, Any] | None


def claim_values(value: object) -> tuple[str, ...]:
    """A claim's value(s) as strings: each element of a list, ``true``/``false``, whole numbers
    without ``.0`` (JSON numbers arrive as floats); objects match nothing."""
    items = value if isinstance(value, list | tuple) else (value,)
    out = []
    for v in items:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        elif isinstance(v, str | int | float):
            out.append(str(v))
    return tuple(out)


def request_principal(claims: Claims) -> str | None:
    """``<iss>/<sub>`` of a verified token, or None."""
    if not claims or not isinstance(claims.get("iss"), str) or not isinstance(claims.get("sub"), str):
        return None
    return f"{claims['iss']}/{claims['sub']}"


@dataclass(frozen=True, slots=True)
class CompiledMatch:
    principals: frozenset[str] | None  # None: anyone
    methods: frozenset[str] | None
    exact_paths: frozenset[str]
    prefixes: tuple[str, ...]
    any_path: bool
    headers: tuple[tuple[str, str], ...]
    request_principals: frozenset[str] | None = None  # None: any end user, or none
    claims: tuple[tuple[str, frozenset[str]], ...] = ()  # claim -> accepted values

    def matches(self, principal: str, method: str, path: str, headers: Mapping[str, str],
                claims: Claims = None) -> bool:
        """``path`` is already normalized the way the rule's paths are (see ``CompiledPolicy``).
        ``claims``: the verified JWT payload; rules on end users never match without one."""
        if self.principals is not None and principal not in self.principals:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if not self.any_path and path not in self.exact_paths and not path.startswith(self.prefixes):
            return False
        if not all(headers.get(k) == v for k, v in self.headers):
            return False
        if self.request_principals is not None and request_principal(claims) not in self.request_principals:
            return False
        if self.claims:
            if not claims:
                return False
            for name, accepted in self.claims:
                if name not in claims or accepted.isdisjoint(claim_values(claims[name])):
                    return False
        return True


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    allow: bool
    dry_run: bool
    match: CompiledMatch


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # the deciding rule, or "default" / "no-policy"
    dry_run: tuple[tuple[str, bool], ...] = ()  # (rule, would allow) for matching dry-run rules
    forbidden: bool = False  # deny as 403 even without a caller principal (gateways)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    default_allow: bool
    deny: tuple[CompiledRule, ...]
    allow: tuple[CompiledRule, ...]
    dry: tuple[CompiledRule, ...]
    # A gateway's callers come from outside the mesh: no principal is expected, so a denial there
    # is "forbidden" (403), never "unauthenticated" (401).
    edge: bool = False
    case_insensitive: bool = False  # paths_case: insensitive (rule paths are compiled lower-case)
    uses_paths: bool = True  # False: no rule looks at the path, so it need not be normalized
    uses_request_auth: bool = False  # some rule matches on a verified JWT (claims, request principals)

    def evaluate(self, principal: str, method: str, path: str, headers: Mapping[str, str],
                 claims: Claims = None) -> Decision:
        """The decision for a request path as Envoy passes it on (normalized here, see the module)."""
        if not self.uses_paths:
            return self._decide(principal, method, path, headers, claims)
        servlet = authz_path(path, self.case_insensitive)
        decision = self._decide(principal, method, servlet, headers, claims)
        if decision.allowed and ";" in path:  # only path parameters make a second reading (paths.readings)
            literal = literal_path(path, self.case_insensitive)
            if literal != servlet:
                decision = _both(decision, self._decide(principal, method, literal, headers, claims))
        return decision

    def _decide(self, principal: str, method: str, path: str, headers: Mapping[str, str], claims: Claims) -> Decision:
        dry = tuple((r.name, r.allow) for r in self.dry if r.match.matches(principal, method, path, headers, claims))
        for rule in self.deny:
            if rule.match.matches(principal, method, path, headers, claims):
                return Decision(False, rule.name, dry)
        for rule in self.allow:
            if rule.match.matches(principal, method, path, headers, claims):
                return Decision(True, rule.name, dry)
        return Decision(self.default_allow, "default", dry)


NO_POLICY = Decision(True, "no-policy")


def _both(allowed: Decision, second: Decision) -> Decision:
    """A path read two ways, allowed under the first reading: the second decides, and dry-run
    rules matching under either are reported."""
    dry = allowed.dry_run + tuple(d for d in second.dry_run if d not in allowed.dry_run)
    return Decision(second.allowed, allowed.rule if second.allowed else second.rule, dry)


def _principal(mesh: Mesh, caller: str) -> str:
    if caller.startswith("spiffe://"):
        return caller
    td = mesh.mesh.trust_domain
    return gateway_id(td, caller) if caller in mesh.gateways and caller not in mesh.services else service_id(td, caller)


def _exact_paths(paths: list[str], case_insensitive: bool, deny: bool) -> frozenset[str]:
    """A rule's exact paths, normalized like request paths; a deny rule's also with (or without)
    a trailing slash: ``/admin`` denies ``/admin/`` too, ``/admin/`` denies ``/admin``."""
    out: set[str] = set()
    for p in paths:
        if p.endswith("*"):
            continue
        path = authz_path(p, case_insensitive)
        out.add(path)
        if deny and path != "/":
            out.add(path[:-1] if path.endswith("/") else path + "/")
    return frozenset(out)


def _compile_match(mesh: Mesh, m: Match, case_insensitive: bool = False, deny: bool = False) -> CompiledMatch:
    exact = _exact_paths(m.paths, case_insensitive, deny)
    # A prefix is matched as a string; normalizing it keeps a trailing "/" ("/admin/*": "/admin/").
    prefixes = tuple(authz_path(p[:-1], case_insensitive) for p in m.paths if p.endswith("*") and p != "*")
    return CompiledMatch(
        principals=frozenset(_principal(mesh, c) for c in m.from_) if m.from_ else None,
        methods=frozenset(x.upper() for x in m.methods) if m.methods else None,
        exact_paths=exact,
        prefixes=prefixes,
        any_path=not m.paths or "*" in m.paths,
        headers=tuple((k.lower(), v) for k, v in sorted(m.headers.items())),
        request_principals=frozenset(m.request_principals) if m.request_principals else None,
        claims=tuple((k, frozenset([v] if isinstance(v, str) else v)) for k, v in sorted(m.claims.items())),
    )


def compile_policy(mesh: Mesh, policy: Policy, edge: bool = False) -> CompiledPolicy:
    case_insensitive = policy.paths_case == "insensitive"
    rules = []
    for r in policy.rules:
        match = r.allow if r.allow is not None else r.deny
        assert match is not None
        compiled = _compile_match(mesh, match, case_insensitive, deny=r.allow is None)
        rules.append(CompiledRule(r.name, r.allow is not None, r.dry_run, compiled))
    return CompiledPolicy(
        default_allow=policy.default == "allow",
        deny=tuple(r for r in rules if not r.allow and not r.dry_run),
        allow=tuple(r for r in rules if r.allow and not r.dry_run),
        dry=tuple(r for r in rules if r.dry_run),
        edge=edge,
        case_insensitive=case_insensitive,
        uses_paths=any(not r.match.any_path for r in rules),
        uses_request_auth=any(r.match.request_principals is not None or r.match.claims for r in rules),
    )


def compile_mesh(mesh: Mesh) -> dict[str, CompiledPolicy]:
    return {name: compile_policy(mesh, policy, edge=name in mesh.gateways) for name, policy in mesh.authorization.items()}
