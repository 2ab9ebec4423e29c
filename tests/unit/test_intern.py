"""A file edit shares the unchanged parts of the last revision, and one that changes only endpoints
is patched like a registration, with the same result as generating from scratch."""

from __future__ import annotations

from pathlib import Path

from xdsd.cache import SnapshotCache
from xdsd.controller import Controller
from xdsd.generators import MeshGenerator, NodeGroup, generate
from xdsd.model import load_mesh
from xdsd.observability.metrics import Metrics
from xdsd.registry.registry import Registry
from xdsd.registry.store import MemoryStore
from xdsd.sources.file import FileSource
from xdsd.sources.intern import intern

MESH = """
gateways:
  edge: {listen: {address: 127.0.0.1, port: 10000}, routes: [{prefix: /a, service: a}, {prefix: /b, service: b}]}
services:
  a: {endpoints: [{address: 10.0.0.1, port: 80}, {address: 10.0.0.2, port: 80}], retries: {attempts: 2}}
  b: {endpoints: [{address: 10.0.1.1, port: 80}]}
"""


def test_unchanged_parts_are_the_last_revisions_objects() -> None:
    old = load_mesh(MESH)
    new, changed = intern(old, load_mesh(MESH.replace("10.0.0.2", "10.0.0.3")))
    assert changed == frozenset({"a"})
    assert new.gateways["edge"] is old.gateways["edge"] and new.services["b"] is old.services["b"]
    assert new.services["a"] is not old.services["a"]
    assert new.services["a"].endpoints[0] is old.services["a"].endpoints[0]  # the unchanged endpoint too
    assert new.services["a"].retries is old.services["a"].retries
    same, nothing = intern(old, load_mesh(MESH))
    assert nothing == frozenset() and same.services == old.services
    _, routes = intern(old, load_mesh(MESH.replace("prefix: /b", "prefix: /bee")))
    assert routes is None  # not only endpoints: generated in full
    _, policy = intern(old, load_mesh(MESH.replace("attempts: 2", "attempts: 3")))
    assert policy is None
    _, added = intern(old, load_mesh(MESH + "  c: {endpoints: [{address: 10.0.2.1, port: 80}]}\n"))
    assert added is None


def test_an_endpoint_edit_is_patched_and_equals_a_full_generation(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    gen = MeshGenerator()
    cache = SnapshotCache(gen)
    group = NodeGroup("edge")
    cache.watch(group, lambda snap, types: None)
    registry = Registry(MemoryStore())
    ctl = Controller(FileSource(path), cache, Metrics(), registry=registry)
    assert ctl.reload()
    hints: list[object] = []
    real_update = cache.update

    def update(revision: object, hint: object = None) -> object:
        hints.append(hint)
        return real_update(revision, hint)

    cache.update = update  # type: ignore[method-assign]
    path.write_text(MESH.replace("10.0.0.2", "10.0.0.9"))
    misses = gen.memo.misses
    assert ctl.reload()
    assert isinstance(hints[-1], tuple) and hints[-1][1] == frozenset({"a"})
    # The changed service's assignment, its EDS decision and its policy tuple: not the whole mesh again.
    assert gen.memo.misses - misses <= 3
    scratch = SnapshotCache(generate)
    scratch.watch(group, lambda snap, types: None)
    scratch.update(load_mesh(MESH.replace("10.0.0.2", "10.0.0.9")))
    patched, fresh = cache.current(group), scratch.current(group)
    assert patched is not None and fresh is not None
    assert {t: ts.version for t, ts in patched.types.items()} == {t: ts.version for t, ts in fresh.types.items()}
