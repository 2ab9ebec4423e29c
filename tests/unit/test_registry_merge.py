"""The merge of registered instances into the file's mesh does work only for what changed: a
service whose instances are the same objects, or new objects that serve the same (a heartbeat),
keeps its merged object; a changed service reuses the endpoints of its unchanged instances."""

from __future__ import annotations

import yaml

from xdsd.model import Mesh, load_mesh
from xdsd.registry.merge import Merger
from xdsd.registry.registry import Registry
from xdsd.registry.store import MemoryStore


def mesh() -> Mesh:
    return load_mesh(yaml.safe_dump({"services": {"web": {}, "api": {}, "static": {
        "endpoints": [{"address": "10.9.9.9", "port": 80}]}}}))


def registry() -> Registry:
    now = [1000.0]
    reg = Registry(MemoryStore(), clock=lambda: now[0])
    for service in ("web", "api"):
        for i in range(5):
            reg.register({"service": service, "instance_id": f"{service}{i}", "address": f"10.0.0.{i}", "port": 80})
    return reg


def test_heartbeats_change_nothing_that_is_served() -> None:
    reg, m, merger = registry(), mesh(), Merger()
    first = merger.merge(m, reg.list())
    again = merger.merge(m, reg.list())
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == frozenset()
    assert again.services["web"] is first.services["web"] and again.services["api"] is first.services["api"]
    for i in range(5):
        reg.heartbeat("web", f"web{i}")  # new instance objects, same endpoints
    beat = merger.merge(m, reg.list())
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == frozenset()
    assert beat.services["web"] is first.services["web"]


def test_a_change_rebuilds_its_service_only_and_keeps_the_other_endpoints() -> None:
    reg, m, merger = registry(), mesh(), Merger()
    first = merger.merge(m, reg.list())
    reg.register({"service": "web", "instance_id": "web2", "address": "10.0.0.2", "port": 80, "weight": 7})
    second = merger.merge(m, reg.list())
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == frozenset({"web"})
    assert second.services["api"] is first.services["api"]
    old, new = first.services["web"].endpoints, second.services["web"].endpoints
    assert [e.weight for e in new] == [1, 1, 7, 1, 1]
    assert all(a is b for j, (a, b) in enumerate(zip(old, new, strict=True)) if j != 2)
    reg.deregister("api", "api0")
    third = merger.merge(m, reg.list())
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == frozenset({"api"})
    assert third.services["api"].endpoints[0].status == "draining"


def test_a_new_file_mesh_reuses_the_endpoints_and_dropped_services_go_back_to_the_file() -> None:
    reg, merger = registry(), Merger()
    first = merger.merge(mesh(), reg.list())
    other = mesh()  # the same content, new objects: a file revision
    second = merger.merge(other, reg.list())
    assert merger.endpoints_changed is None
    assert second.services["web"] is not first.services["web"]
    assert all(a is b for a, b in zip(first.services["web"].endpoints, second.services["web"].endpoints, strict=True))
    for i in range(5):
        reg.deregister("api", f"api{i}")
    reg.clock = lambda: 1006.0  # past the drain (5 s), within the TTL (10 s)
    reg.sweep()
    third = merger.merge(other, reg.list())
    assert third.services["api"] is other.services["api"]
    assert merger.endpoints_changed is not None and merger.endpoints_changed[1] == frozenset({"api"})


def test_a_registered_static_address_is_served_once() -> None:
    reg = Registry(MemoryStore())
    reg.register({"service": "static", "instance_id": "dup", "address": "10.9.9.9", "port": 80})  # no mesh check here
    merged = Merger().merge(mesh(), reg.list())
    assert [(e.address, e.port) for e in merged.services["static"].endpoints] == [("10.9.9.9", 80)]
