"""A budget of time per event-loop iteration, for work that comes in bursts (a reconnect storm's
first snapshots, its first requests): past it, the work waits for a later iteration, so that
timers, ACKs and new connections are not held behind the whole burst."""

from __future__ import annotations

import asyncio


class IterationBudget:
    """At most ``seconds`` of one kind of work per loop iteration; what was spent is forgotten when
    the next iteration starts (a reset queued with ``call_soon`` runs there)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self._reset_scheduled = False

    def exhausted(self) -> bool:
        return self.spent >= self.seconds

    def charge(self, seconds: float) -> None:
        self.spent += seconds
        if self._reset_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): nothing to spread over
            self.spent = 0.0
            return
        self._reset_scheduled = True
        loop.call_soon(self._reset)

    def _reset(self) -> None:
        self._reset_scheduled = False
        self.spent = 0.0
