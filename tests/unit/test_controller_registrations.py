"""Registrations through the controller: the cache is patched (not regenerated) while the file is
unchanged, identities are issued once per file revision, and the authorization service is handed
a new mesh only when more than registered endpoints changed."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import yaml

from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.cache import SnapshotCache
from xdsd.controller import Controller
from xdsd.generators import MeshGenerator, NodeGroup
from xdsd.model import Mesh
from xdsd.observability.metrics import Metrics
from xdsd.registry.registry import Registry
from xdsd.registry.store import LocalStore, MemoryStore
from xdsd.sources.file import FileSource

MESH = {
    "services": {
        "reviews": {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080}},
        "shop": {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080, "upstreams": {"reviews": 9081}}},
    },
}


def test_registrations_patch_and_skip_what_does_not_read_endpoints(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(MESH))
    ids = IdentityStore(CertificateAuthority.load_or_create(tmp_path, "mesh"), dt.timedelta(hours=1))
    cache = SnapshotCache(MeshGenerator(lambda: ids.credentials))
    seen: list[Mesh] = []
    registry = Registry(MemoryStore())
    ctl = Controller(FileSource(path), cache, Metrics(), ids, on_mesh=seen.append, registry=registry)
    cache.watch(NodeGroup("shop"), lambda snap, types: None)
    ensured: list[object] = []
    real_ensure = ids.ensure
    monkeypatch.setattr(ids, "ensure", lambda *a, **k: ensured.append(a) or real_ensure(*a, **k))
    hints: list[object] = []
    real_update = cache.update
    monkeypatch.setattr(cache, "update", lambda revision, hint=None: hints.append(hint) or real_update(revision, hint))

    assert ctl.reload()
    assert len(seen) == 1 and len(ensured) == 1 and hints == [None]
    for i in range(3):
        registry.register({"service": "reviews", "address": f"10.0.0.{i + 1}", "port": 15006, "instance_id": f"r{i}"})
    assert len(hints) == 4 and all(h is not None and h[1] == {"reviews"} for h in hints[1:])  # type: ignore[index]
    assert len(seen) == 1  # authorization keeps its mesh: only endpoints changed
    assert len(ensured) == 1  # no identity to issue or drop
    snap = cache.snapshot(NodeGroup("shop"))
    assert snap is not None
    cla = snap.get("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment").resources["reviews"]
    assert b"10.0.0.3" in cla.body

    path.write_text(yaml.safe_dump({**MESH, "mesh": {"trust_domain": "other.local"}}))
    assert ctl.reload()
    assert len(seen) == 2 and len(ensured) == 2 and hints[-1] is None  # a new file: everything again
    registry.deregister("reviews", "r0")
    assert len(seen) == 2 and hints[-1] is not None


def test_a_registry_loaded_from_a_poisoned_file_is_served(tmp_path: Path) -> None:
    """A registrations.json written before registration input was validated (a lone surrogate in
    a zone made every later revision fail, and every xDS stream after a restart): the bad entries
    are dropped at load, and what is left, and what registers next, reaches EDS."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(MESH))
    good = {"service": "reviews", "instance_id": "r1", "address": "10.0.0.1", "port": 15006, "weight": 1,
            "zone": "zone-a", "labels": {}, "ttl": 600.0, "state": "ACTIVE", "expires_at": time.time() + 600}
    state = tmp_path / "state"
    state.mkdir()
    (state / "registrations.json").write_text(json.dumps({"instances": [
        good, {**good, "instance_id": "bad", "address": "10.0.0.2", "zone": "\ud800"},
        {**good, "instance_id": "bad2", "address": "10.0.0.3", "labels": {"v": "\udc80"}}]}))
    ids = IdentityStore(CertificateAuthority.load_or_create(tmp_path, "mesh"), dt.timedelta(hours=1))
    cache = SnapshotCache(MeshGenerator(lambda: ids.credentials))
    registry = Registry(LocalStore(state))
    ctl = Controller(FileSource(path), cache, Metrics(), ids, registry=registry)
    cache.watch(NodeGroup("shop", zone="zone-a"), lambda snap, types: None)
    assert ctl.reload()
    registry.register({"service": "reviews", "address": "10.0.0.4", "port": 15006, "zone": "z\u00fcrich",
                       "labels": {"team": "caf\u00e9 \u2603"}})
    snap = cache.snapshot(NodeGroup("shop", zone="zone-a"))
    assert snap is not None
    body = snap.get("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment").resources["reviews"].body
    assert b"10.0.0.1" in body and b"10.0.0.4" in body and "zürich".encode() in body
    assert b"10.0.0.2" not in body and b"10.0.0.3" not in body


async def test_a_diff_validates_and_generates_off_the_loop(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """POST /v1/config/diff imports processors, reads files, signs SVIDs and generates every group:
    in a worker thread, with the same report as on the loop."""
    import threading

    import xdsd.controller as controller_mod

    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(MESH))
    ids = IdentityStore(CertificateAuthority.load_or_create(tmp_path, "mesh"), dt.timedelta(hours=1))
    cache = SnapshotCache(MeshGenerator(lambda: ids.credentials))
    registry = Registry(MemoryStore())
    ctl = Controller(FileSource(path), cache, Metrics(), ids, registry=registry)
    cache.watch(NodeGroup("shop"), lambda snap, types: None)
    assert ctl.reload()
    registry.register({"service": "reviews", "address": "10.0.0.1", "port": 15006, "instance_id": "r1"})
    candidate = {**MESH, "services": {**MESH["services"], "ratings": {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080}}}}
    candidate["services"]["shop"] = {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080,
                                                 "upstreams": {"reviews": 9081, "ratings": 9082}}}
    content = yaml.safe_dump(candidate).encode()
    threads: list[str] = []
    for name in ("parse_bytes", "generate"):
        real = getattr(controller_mod, name)
        monkeypatch.setattr(controller_mod, name, lambda *a, _real=real, **k: threads.append(threading.current_thread().name) or _real(*a, **k))
    off = await ctl.diff_off_loop(content)
    assert threads and threading.main_thread().name not in threads, threads
    threads.clear()
    on = ctl.diff(content)
    assert threads and set(threads) == {threading.main_thread().name}
    assert json.dumps(off, sort_keys=True) == json.dumps(on, sort_keys=True)
    assert off["groups"] and off["valid"], off  # shop gets a listener and clusters for ratings
