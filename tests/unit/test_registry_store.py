"""The local registry store: what it writes reads back the same, field for field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xdsd.registry.instance import Instance
from xdsd.registry.store import LocalStore


def test_as_json_carries_every_field() -> None:
    inst = Instance(service="reviews", instance_id="r-1", address="10.0.0.1", port=8080, weight=3, zone="zone-a",
                    labels={"version": "v2"}, ttl=30.0, state="DRAINING", expires_at=1234.5)
    assert inst.as_json() == dataclasses.asdict(inst)
    assert list(inst.as_json()) == [f.name for f in dataclasses.fields(Instance)]
    assert inst.as_json()["labels"] is not inst.labels  # a copy: the instance stays frozen
    assert Instance.from_json(inst.as_json()) == inst


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.load() == []
    insts = [Instance(service=f"s{i % 3}", instance_id=f"i-{i}", address=f"10.0.0.{i}", port=80 + i,
                      labels={"n": str(i)} if i % 2 else {}, expires_at=float(i)) for i in range(20)]
    store.save(insts)
    assert store.load() == insts
    store.save(insts[:3])
    assert store.load() == insts[:3]
