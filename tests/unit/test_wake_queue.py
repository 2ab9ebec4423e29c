"""The wake queue sizes its batches so that one loop iteration of woken passes stays short."""

from __future__ import annotations

import asyncio
import time

from xdsd.server.stream import WakeQueue


class _Fake:
    def __init__(self) -> None:
        self.wake = asyncio.Event()


async def _pass(stream: _Fake, cost: float) -> None:
    await stream.wake.wait()
    time.sleep(cost)  # noqa: ASYNC251 - the pass holds the loop, as building and sending a response does


async def _run(queue: WakeQueue, n: int, cost: float) -> None:
    streams = [_Fake() for _ in range(n)]
    tasks = [asyncio.create_task(_pass(s, cost)) for s in streams]
    await asyncio.sleep(0)
    for s in streams:
        queue.add(s)  # type: ignore[arg-type]
    await asyncio.gather(*tasks)


def test_heavy_passes_get_smaller_batches_and_light_ones_the_full_batch() -> None:
    async def main() -> None:
        queue = WakeQueue()
        await _run(queue, 300, 0.0005)  # 64 passes of 0.5 ms: 32 ms iterations
        assert queue.batch < 32
        heavy = queue.batch
        await _run(queue, 2000, 0.0)
        assert queue.batch > heavy
        assert queue.batch >= WakeQueue.BATCH // 2  # noise on a busy machine may keep it below the top

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


def test_first_nodes_of_many_groups_have_their_snapshots_built_across_iterations() -> None:
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

    async def main() -> None:
        cache = SnapshotCache(generate)
        cache.update(load_mesh(text))
        queue = WakeQueue()
        built_per_iteration: list[int] = []
        real = cache.snapshot

        def counting(group):  # type: ignore[no-untyped-def]
            if cache.current(group) is None:
                built_per_iteration[-1] += 1
                time.sleep(0.002)  # a build that costs its share of the budget
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
        assert max(built_per_iteration) <= 3  # 2 ms each against a 4 ms budget (the last may overrun)

    asyncio.run(main())
