"""Policies compiled for fast evaluation, and the evaluation itself (pure, no I/O).

Semantics, per destination service:
1. Deny rules are checked first: the first matching one denies.
2. Then allow rules: the first matching one allows.
3. Otherwise the policy's ``default`` decides (``deny`` unless set).
Dry-run rules are evaluated too, but only reported: they never change the decision.
A service without a policy allows everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xdsd.ca import gateway_id, service_id
from xdsd.model import Mesh
from xdsd.model.mesh import Match, Policy


@dataclass(frozen=True, slots=True)
class CompiledMatch:
    principals: frozenset[str] | None  # None: anyone
    methods: frozenset[str] | None
    exact_paths: frozenset[str]
    prefixes: tuple[str, ...]
    any_path: bool
    headers: tuple[tuple[str, str], ...]

    def matches(self, principal: str, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.principals is not None and principal not in self.principals:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if not self.any_path and path not in self.exact_paths and not path.startswith(self.prefixes):
            return False
        return all(headers.get(k) == v for k, v in self.headers)


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

    def evaluate(self, principal: str, method: str, path: str, headers: Mapping[str, str]) -> Decision:
        dry = tuple((r.name, r.allow) for r in self.dry if r.match.matches(principal, method, path, headers))
        for rule in self.deny:
            if rule.match.matches(principal, method, path, headers):
                return Decision(False, rule.name, dry)
        for rule in self.allow:
            if rule.match.matches(principal, method, path, headers):
                return Decision(True, rule.name, dry)
        return Decision(self.default_allow, "default", dry)


NO_POLICY = Decision(True, "no-policy")


def _principal(mesh: Mesh, caller: str) -> str:
    if caller.startswith("spiffe://"):
        return caller
    td = mesh.mesh.trust_domain
    return gateway_id(td, caller) if caller in mesh.gateways and caller not in mesh.services else service_id(td, caller)


def _compile_match(mesh: Mesh, m: Match) -> CompiledMatch:
    exact = frozenset(p for p in m.paths if not p.endswith("*"))
    prefixes = tuple(p[:-1] for p in m.paths if p.endswith("*") and p != "*")
    return CompiledMatch(
        principals=frozenset(_principal(mesh, c) for c in m.from_) if m.from_ else None,
        methods=frozenset(x.upper() for x in m.methods) if m.methods else None,
        exact_paths=exact,
        prefixes=prefixes,
        any_path=not m.paths or "*" in m.paths,
        headers=tuple((k.lower(), v) for k, v in sorted(m.headers.items())),
    )


def compile_policy(mesh: Mesh, policy: Policy, edge: bool = False) -> CompiledPolicy:
    rules = []
    for r in policy.rules:
        match = r.allow if r.allow is not None else r.deny
        assert match is not None
        rules.append(CompiledRule(r.name, r.allow is not None, r.dry_run, _compile_match(mesh, match)))
    return CompiledPolicy(
        default_allow=policy.default == "allow",
        deny=tuple(r for r in rules if not r.allow and not r.dry_run),
        allow=tuple(r for r in rules if r.allow and not r.dry_run),
        dry=tuple(r for r in rules if r.dry_run),
        edge=edge,
    )


def compile_mesh(mesh: Mesh) -> dict[str, CompiledPolicy]:
    return {name: compile_policy(mesh, policy, edge=name in mesh.gateways) for name, policy in mesh.authorization.items()}
