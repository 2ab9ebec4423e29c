"""When a registration goes, on a clock the test controls: an instance that stops heart-beating is
swept at its TTL, not before; heartbeats push the TTL on; a deregistered one drains for the drain
time, then goes. With the sweep every SWEEP_EVERY, a lapsed instance leaves within TTL + 1 s (the
README's promise) whatever the machine's load does to the push that follows."""

from __future__ import annotations

import asyncio

from xdsd.registry.registry import SWEEP_EVERY, Registry
from xdsd.registry.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _registry(clock: Clock) -> Registry:
    return Registry(MemoryStore(), drain_seconds=5.0, clock=clock)


def _ids(reg: Registry) -> list[str]:
    return [i.instance_id for i in reg.list()]


def test_a_lapsed_instance_is_swept_at_its_ttl_not_before() -> None:
    clock = Clock()
    reg = _registry(clock)
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 80, "ttl": 2})
    clock.now += 1.999
    assert reg.sweep() == [] and _ids(reg) == ["a"]
    clock.now += 0.001
    assert [i.instance_id for i in reg.sweep()] == ["a"] and _ids(reg) == []


def test_heartbeats_push_the_ttl_on() -> None:
    clock = Clock()
    reg = _registry(clock)
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 80, "ttl": 2})
    for _ in range(10):  # 15 s of heartbeats every 1.5 s, each within the TTL
        clock.now += 1.5
        reg.heartbeat("web", "a")
        assert reg.sweep() == []
    clock.now += 2
    assert [i.instance_id for i in reg.sweep()] == ["a"]


def test_a_deregistered_instance_drains_then_goes() -> None:
    clock = Clock()
    reg = _registry(clock)
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 80, "ttl": 60})
    assert reg.deregister("web", "a").state == "DRAINING"
    clock.now += 4.999
    assert reg.sweep() == [] and [i.state for i in reg.list()] == ["DRAINING"]
    clock.now += 0.001
    assert [i.instance_id for i in reg.sweep()] == ["a"]


def test_the_sweep_runs_often_enough_for_ttl_plus_one_second() -> None:
    assert SWEEP_EVERY <= 0.1

    async def main() -> None:
        clock = Clock()
        reg = _registry(clock)
        reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 80, "ttl": 2})
        stop = asyncio.Event()
        sweeper = asyncio.create_task(reg.sweep_forever(stop, every=0.01))
        clock.now += 2
        for _ in range(500):  # bounded: the sweeper takes it within a few of its iterations
            if not _ids(reg):
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(sweeper, 5)
        assert _ids(reg) == []

    asyncio.run(main())
