"""The wake queue sizes its batches so that one loop iteration of woken passes stays short.

Time here is a clock the test advances (a pass "costs" what it adds to it), so batch sizes are exact
and no load on the machine can change them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from xdsd.server import stream as stream_module
from xdsd.server.stream import WakeQueue


class FakeClock:
    """``perf_counter`` for the code under test: moves only when a fake pass or build says so. In
    place of a module's ``time``, everything else is the real ``time``'s."""

    def __init__(self) -> None:
        self.now = 1024.0  # with the costs below (multiples of 1/2048 s), every sum is exact

    def __call__(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _Fake:
    def __init__(self) -> None:
        self.wake = asyncio.Event()


async def _run(queue: WakeQueue, clock: FakeClock, n: int, cost: float) -> list[int]:
    """Wakes ``n`` streams whose pass costs ``cost`` seconds; returns how many ran per iteration."""
    streams = [_Fake() for _ in range(n)]
    per_iteration: list[int] = []
    iteration = [0]

    async def one_pass(s: _Fake) -> None:
        await s.wake.wait()
        clock.now += cost  # the pass holds the loop, as building and sending a response does
        per_iteration[iteration[0]] += 1

    tasks = [asyncio.create_task(one_pass(s)) for s in streams]
    await asyncio.sleep(0)
    for s in streams:
        queue.add(s)  # type: ignore[arg-type]
    while not all(t.done() for t in tasks):
        per_iteration.append(0)
        await asyncio.sleep(0)
        iteration[0] += 1
    await asyncio.gather(*tasks)
    return [n for n in per_iteration if n]


def test_heavy_passes_get_smaller_batches_and_light_ones_the_full_batch() -> None:
    async def main() -> None:
        clock = FakeClock()
        queue = WakeQueue(clock=clock)
        # 64 passes of 1/2048 s (~0.5 ms): a 31 ms iteration, four times the target: the next batch
        # is 16, whose 7.8 ms iterations are on target, so it stays.
        batches = await _run(queue, clock, 300, 1 / 2048)
        assert batches[:3] == [64, 16, 16] and queue.batch == 16
        assert sum(batches) == 300
        # Free passes: the batch doubles back to the full 64.
        batches = await _run(queue, clock, 2000, 0.0)
        assert batches[:3] == [16, 32, 64] and queue.batch == WakeQueue.BATCH
        # Very heavy passes never get less than MIN_BATCH.
        await _run(queue, clock, 200, 1 / 8)
        assert queue.batch == WakeQueue.MIN_BATCH

    asyncio.run(main())


def test_every_stream_is_woken_exactly_once_and_in_order() -> None:
    async def main() -> None:
        queue = WakeQueue()
        streams = [_Fake() for _ in range(500)]
        order: list[int] = []

        async def wait(i: int) -> None:
            await streams[i].wake.wait()
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(500)]
        await asyncio.sleep(0)
        for s in streams:
            queue.add(s)  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
        assert order == list(range(500))

    asyncio.run(main())


def test_a_stream_woken_again_before_its_turn_is_queued_once() -> None:
    """Revisions faster than the passes (a burst of registrations, a slow machine): the queue holds
    each stream once, not once per revision, and a stream woken after its pass is queued again."""
    async def main() -> None:
        queue = WakeQueue()
        streams = [_Fake() for _ in range(200)]
        for _ in range(50):  # 50 revisions, each concerning every stream, before the loop runs
            for s in streams:
                queue.add(s)  # type: ignore[arg-type]
        assert len(queue) == len(streams)
        await asyncio.wait_for(asyncio.gather(*(s.wake.wait() for s in streams)), 5)
        assert len(queue) == 0
        for s in streams:
            s.wake.clear()
        queue.add(streams[7])  # type: ignore[arg-type]
        assert len(queue) == 1
        await asyncio.wait_for(streams[7].wake.wait(), 5)

    asyncio.run(main())


def test_snapshot_building_has_a_budget_per_loop_iteration() -> None:
    async def main() -> None:
        queue = WakeQueue()
        assert queue.may_build()
        queue.built(WakeQueue.BUILD_BUDGET_SECONDS / 2)
        assert queue.may_build()
        queue.built(WakeQueue.BUILD_BUDGET_SECONDS)
        assert not queue.may_build()  # the rest of this iteration builds nothing more
        await asyncio.sleep(0)
        assert queue.may_build()  # the next one starts afresh

    asyncio.run(main())


def test_first_nodes_of_many_groups_have_their_snapshots_built_across_iterations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from xdsd import typeurls
    from xdsd.cache import SnapshotCache
    from xdsd.generators import generate
    from xdsd.model import load_mesh
    from xdsd.server.observer import NullObserver
    from xdsd.server.stream import Stream

    services = [f"s{i}" for i in range(40)]
    text = "services:\n" + "".join(
        f"  {s}:\n    sidecar: {{inbound: {{port: 15006}}, app_port: 9080, upstreams: {{{services[(i + 1) % 40]}: 9081}}}}\n"
        for i, s in enumerate(services))
    clock = FakeClock()
    # The stream times each build with perf_counter: on the fake clock, a build costs what it adds.
    monkeypatch.setattr(stream_module, "time", clock)

    async def main() -> None:
        cache = SnapshotCache(generate)
        cache.update(load_mesh(text))
        queue = WakeQueue(clock=clock)
        built_per_iteration: list[int] = []
        real = cache.snapshot

        def counting(group):  # type: ignore[no-untyped-def]
            if cache.current(group) is None:
                built_per_iteration[-1] += 1
                clock.now += 0.0025  # a build that costs more than half the budget
            return real(group)

        cache.snapshot = counting  # type: ignore[method-assign]
        streams = [Stream(cache, NullObserver(), delta=False, fixed_type=None, peer="p", wakes=queue) for _ in services]
        for s, name in zip(streams, services, strict=True):
            req = discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER)
            req.node.id, req.node.cluster = f"{name}-1", name
            s.on_sotw_request(req)  # attaches: no snapshot is built while reading requests
        assert all(s.snapshot is None for s in streams)
        answered: set[int] = set()
        for _ in range(200):
            built_per_iteration.append(0)
            for i, s in enumerate(streams):
                if s.wake.is_set():
                    s.wake.clear()
                    if s.responses():
                        answered.add(i)
            await asyncio.sleep(0)
            if len(answered) == len(streams):
                break
        assert len(answered) == len(streams)  # every first node got its clusters
        # 2.5 ms each against a 4 ms budget: the second build overruns it, so two per iteration,
        # 40 groups in 20 iterations.
        builds = [n for n in built_per_iteration if n]
        assert builds == [2] * 20, builds

    asyncio.run(main())
