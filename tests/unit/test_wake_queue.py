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
    time.sleep(cost)  # the pass holds the loop, as building and sending a response does


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
