"""Waking streams for a new snapshot, a bounded batch per event-loop iteration.

A revision can concern thousands of streams at once; woken together, their passes would all run in
one loop iteration and hold the loop (timers, new connections, ACKs) for the whole fan-out. In
batches, other work interleaves and no single iteration is long.

A stream is in the queue once however often it is woken before its turn: its pass serves whatever
snapshot is current then. (Queued once per wake, a backlog grew by every affected stream at every
revision while the server lagged behind a burst of registrations.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from xdsd.loopbudget import IterationBudget

if TYPE_CHECKING:
    from xdsd.server.stream import Stream


class WakeQueue:
    BATCH = 64
    # The batch adapts so that an iteration running a batch of passes stays near this long (passes
    # differ widely in cost: one that sends a large assignment, one that sends a small route).
    TARGET_SECONDS = 0.008
    MIN_BATCH = 4
    # A group's first snapshot (its first node connecting) is built in a pass; a reconnect storm
    # brings many groups at once: at most this much building per loop iteration.
    BUILD_BUDGET_SECONDS = 0.004

    def __init__(self, clock: object = time.perf_counter) -> None:
        self._queue: deque[Stream] = deque()
        self._queued: set[Stream] = set()  # what ``_queue`` holds: each stream once
        self._scheduled = False
        self.batch = self.BATCH
        self._clock = clock
        self._drained_at = 0.0  # when the last batch was woken, while draining continues
        self._build = IterationBudget(self.BUILD_BUDGET_SECONDS)  # snapshot building per iteration

    def may_build(self) -> bool:
        return not self._build.exhausted()

    def built(self, seconds: float) -> None:
        self._build.charge(seconds)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, stream: Stream) -> None:
        if stream in self._queued:
            return  # already owed a pass, which will serve the newest snapshot
        self._queued.add(stream)
        self._queue.append(stream)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): wake at once
            while self._queue:
                self._pop().wake.set()
            return
        self._scheduled = True
        loop.call_soon(self._drain, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()  # type: ignore[operator]
        if self._drained_at:
            # The previous batch's passes ran in the iteration that just ended: size the next one.
            took = now - self._drained_at
            if took > self.TARGET_SECONDS:
                self.batch = max(self.MIN_BATCH, int(self.batch * self.TARGET_SECONDS / took))
            elif took < self.TARGET_SECONDS / 2:
                self.batch = min(self.BATCH, self.batch * 2)
        for _ in range(min(self.batch, len(self._queue))):
            self._pop().wake.set()
        if self._queue:
            self._drained_at = now
            loop.call_soon(self._drain, loop)
        else:
            self._drained_at = 0.0
            self._scheduled = False

    def _pop(self) -> Stream:
        stream = self._queue.popleft()
        self._queued.discard(stream)
        return stream
