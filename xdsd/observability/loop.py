"""Event-loop health: how late the loop wakes a task that asked to sleep a few milliseconds.

Anything that holds the loop (a long generation, a huge serialization, a synchronous call) shows
up here as a stall. The maximum since the last reset answers "did this scenario ever stall?"."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

TICK = 0.005
# While the process uses less CPU than this share of the wall clock, the probe sleeps this long
# between samples instead of TICK: an idle control plane does not wake 200 times a second. The
# share is well above what sampling every TICK costs by itself (a wake-up of the loop with a
# thousand connections open is ~1% of 5 ms), or the probe would keep itself in the fine mode.
IDLE_CPU_SHARE = 0.05
IDLE_TICK = 1.0


class LoopMonitor:
    def __init__(self, observe: Callable[[float], None] | None = None, tick: float = TICK) -> None:
        self._observe = observe
        self._tick = tick
        self.max_stall = 0.0
        self.since = time.time()
        self.max_gc = 0.0  # the longest garbage-collector pause, a frequent cause of stalls
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.max_gc = max(self.max_gc, time.perf_counter() - self._gc_started)

    def reset(self) -> dict[str, float]:
        """The largest stall since the last reset (seconds), then start over."""
        out = {"max_stall_seconds": self.max_stall, "max_gc_seconds": self.max_gc, "since": self.since,
               "until": time.time()}
        self.max_stall = 0.0
        self.max_gc = 0.0
        self.since = time.time()
        return out

    async def run(self, stop: asyncio.Event) -> None:
        clock = time.perf_counter
        gc.callbacks.append(self._on_gc)
        try:
            await self._run(stop, clock)
        finally:
            gc.callbacks.remove(self._on_gc)

    async def _run(self, stop: asyncio.Event, clock: Callable[[], float]) -> None:
        """Samples every TICK while the process is busy; when it has been (nearly) idle since the
        last sample, every IDLE_TICK (a stall needs work: the first busy second is sampled coarsely,
        the rest finely)."""
        tick = self._tick
        cpu = time.process_time()
        while not stop.is_set():
            start = clock()
            await asyncio.sleep(tick)
            elapsed = clock() - start
            stall = max(0.0, elapsed - tick)
            if stall > self.max_stall:
                self.max_stall = stall
            if self._observe is not None:
                self._observe(stall)
            used, cpu = time.process_time() - cpu, time.process_time()
            tick = IDLE_TICK if used < IDLE_CPU_SHARE * elapsed else self._tick
