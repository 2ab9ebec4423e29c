"""The local registry store: what it writes reads back the same, field for field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xdsd.registry.instance import Instance
from xdsd.registry.registry import SAVE_EVERY, Registry
from xdsd.registry.store import LocalStore, MemoryStore


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


def test_local_store_reencodes_only_changed_instances_and_reads_back_the_latest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    insts = [Instance(service="s", instance_id=f"i-{i}", address="10.0.0.1", port=80 + i, expires_at=1.0)
             for i in range(5)]
    store.save(insts)
    beat = dataclasses.replace(insts[2], expires_at=99.0)  # a heartbeat makes a new object
    store.save([*insts[:2], beat, *insts[3:]])
    assert store.load() == [*insts[:2], beat, *insts[3:]]
    store.save(insts[3:])
    assert store.load() == insts[3:]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def save(self, instances: list[Instance]) -> None:
        self.saves += 1
        super().save(instances)


def test_a_burst_of_registrations_is_saved_once_more_not_once_each() -> None:
    now = [1000.0]
    store = CountingStore()
    registry = Registry(store, clock=lambda: now[0])
    for i in range(200):
        registry.register({"service": "web", "instance_id": f"w-{i}", "address": "10.0.0.1", "port": 1000 + i})
    assert store.saves == 1  # the first at once, the rest wait for the sweep
    registry.sweep()
    assert store.saves == 1  # not SAVE_EVERY yet
    now[0] += SAVE_EVERY
    registry.sweep()
    assert store.saves == 2 and len(store.load()) == 200
    registry.sweep()
    assert store.saves == 2  # nothing new
    now[0] += 10
    registry.register({"service": "web", "instance_id": "late", "address": "10.0.0.2", "port": 80})
    assert store.saves == 3  # after a quiet period a change is written at once
    registry.heartbeat("web", "late")
    registry.flush()
    assert store.saves == 4 and {i.instance_id for i in store.load()} >= {"late", "w-0"}
