"""Imports run one way (DESIGN.md: sources -> model -> generators -> cache -> servers): a test that
reads every module's imports (function-level ones too) and fails on an edge against the order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "xdsd"

# module prefix -> prefixes it must not import (exceptions in ALLOWED)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "xdsd.node": ("xdsd",),  # the leaf: who a proxy is
    "xdsd.errors": ("xdsd",),
    "xdsd.typeurls": ("xdsd",),
    "xdsd.wire": ("xdsd",),
    "xdsd.authz.contract": ("xdsd",),  # what generated config and the authz servers agree on
    "xdsd.authz.paths": ("xdsd",),  # the path normalization rules validate and authorization share
    "xdsd.model": ("xdsd.generators", "xdsd.cache", "xdsd.server", "xdsd.transport", "xdsd.controller", "xdsd.app",
                   "xdsd.admin", "xdsd.registry", "xdsd.sources", "xdsd.auth", "xdsd.authz", "xdsd.ca"),
    "xdsd.generators": ("xdsd.cache", "xdsd.server", "xdsd.transport", "xdsd.controller", "xdsd.app", "xdsd.admin",
                        "xdsd.registry", "xdsd.sources", "xdsd.auth", "xdsd.authz"),
    "xdsd.cache": ("xdsd.generators", "xdsd.model", "xdsd.node", "xdsd.server", "xdsd.transport", "xdsd.controller",
                   "xdsd.app", "xdsd.admin", "xdsd.registry", "xdsd.sources", "xdsd.auth", "xdsd.authz", "xdsd.ca"),
    "xdsd.server": ("xdsd.generators", "xdsd.model", "xdsd.controller", "xdsd.app", "xdsd.admin", "xdsd.registry",
                    "xdsd.sources", "xdsd.authz", "xdsd.ca", "xdsd.transport"),
    "xdsd.transport": ("xdsd.server", "xdsd.cache", "xdsd.generators", "xdsd.model", "xdsd.controller", "xdsd.app",
                       "xdsd.admin", "xdsd.registry", "xdsd.sources", "xdsd.authz", "xdsd.ca"),
    "xdsd.auth": ("xdsd.server", "xdsd.transport", "xdsd.cache", "xdsd.generators", "xdsd.controller", "xdsd.app",
                  "xdsd.admin", "xdsd.registry", "xdsd.sources", "xdsd.authz"),
    "xdsd.authz": ("xdsd.server", "xdsd.cache", "xdsd.generators", "xdsd.controller", "xdsd.app", "xdsd.admin",
                   "xdsd.registry", "xdsd.sources"),
    "xdsd.ca": ("xdsd.server", "xdsd.transport", "xdsd.cache", "xdsd.generators", "xdsd.controller", "xdsd.app",
                "xdsd.admin", "xdsd.registry", "xdsd.sources"),
    "xdsd.registry": ("xdsd.server", "xdsd.transport", "xdsd.cache", "xdsd.generators", "xdsd.controller",
                      "xdsd.app", "xdsd.admin"),
    "xdsd.sources": ("xdsd.server", "xdsd.transport", "xdsd.cache", "xdsd.generators", "xdsd.controller",
                     "xdsd.app", "xdsd.admin", "xdsd.registry"),
    "xdsd.store": ("xdsd.server", "xdsd.transport", "xdsd.cache", "xdsd.generators", "xdsd.controller",
                   "xdsd.app", "xdsd.admin"),  # a source: feeds the controller, never reads what it builds
    "xdsd.observability": ("xdsd.app", "xdsd.controller", "xdsd.admin"),
    # Processors see only their API: nothing of the mesh, the generators or the servers.
    "xdsd.processing": ("xdsd.model", "xdsd.generators", "xdsd.cache", "xdsd.server", "xdsd.transport",
                        "xdsd.controller", "xdsd.app", "xdsd.admin", "xdsd.registry", "xdsd.sources", "xdsd.auth",
                        "xdsd.authz", "xdsd.ca", "xdsd.extproc"),
    # The ext_proc service, like authz: reads the mesh, never the generators or the xDS server.
    "xdsd.extproc": ("xdsd.server", "xdsd.cache", "xdsd.generators", "xdsd.controller", "xdsd.app", "xdsd.admin",
                     "xdsd.registry", "xdsd.sources", "xdsd.transport"),
}
# Deliberate exceptions: a lower layer's input types that the layer above produces.
ALLOWED: dict[str, tuple[str, ...]] = {
    "xdsd.generators": ("xdsd.cache.inputs", "xdsd.authz.contract"),
    "xdsd.model": ("xdsd.authz.paths",),
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = _module(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {n for n in found if n == "xdsd" or n.startswith("xdsd.")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[_module(p) for p in MODULES])
def test_imports_run_one_way(path: Path) -> None:
    module = _module(path)
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        if not _under(module, layer):
            continue
        allowed = ALLOWED.get(layer, ())
        for name in _imports(path):
            if _under(name, layer) or any(_under(name, a) for a in allowed):
                continue
            if any(_under(name, f) for f in forbidden):
                bad.append(name)
    assert not bad, f"{module} imports {sorted(set(bad))} against the layer order"


def test_every_layer_exists() -> None:
    modules = {_module(p) for p in MODULES}
    for layer in FORBIDDEN:
        assert any(_under(m, layer) for m in modules), layer
