"""Which processed phases may go to the worker pool now: one owner (a gateway or a service) never
takes every worker, and nothing waits without bound.

Per owner, at most ``per_owner`` phases are in the pool at once (running, or queued there); a slot
is freed when the worker is done with the call, not when its caller was answered (a timed-out
call still running keeps its owner's slot, and only its owner's). At most ``waiting`` more of the
owner's phases wait for one of its slots (first come, first served; the wait counts against the
step's timeout); at most ``total`` phases of all owners are in the pool or waiting. A phase past
these bounds is refused at once: the servicer answers it with the step's failure mode (outcome
``overloaded``, counted). Runs on the event loop only: no locks."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Literal

Admitted = Literal["ok", "overloaded", "timeout"]


class Admission:
    def __init__(self, workers: int, per_owner: int | None = None, waiting: int | None = None,
                 total: int | None = None) -> None:
        self.per_owner = per_owner or max(1, workers // 2)
        self.waiting = waiting if waiting is not None else 4 * workers
        self.total = total or 16 * workers
        self._in_pool: dict[str, int] = {}
        self._lines: dict[str, deque[asyncio.Future[None]]] = {}
        self._count = 0  # phases in the pool or waiting, all owners

    async def enter(self, owner: str, timeout: float) -> Admitted:
        """A slot of ``owner``'s, within ``timeout`` seconds; "ok" must be followed by one ``leave``."""
        line = self._lines.get(owner)
        if self._in_pool.get(owner, 0) < self.per_owner and not line:
            if self._count >= self.total:
                return "overloaded"
            self._in_pool[owner] = self._in_pool.get(owner, 0) + 1
            self._count += 1
            return "ok"
        if line is None:
            line = self._lines[owner] = deque()
        if len(line) >= self.waiting or self._count >= self.total:
            return "overloaded"
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(turn)
        self._count += 1
        try:
            await asyncio.wait((turn,), timeout=timeout)
        except asyncio.CancelledError:
            if turn.done():  # handed a slot just as its stream ended: pass it on
                self.leave(owner)
            raise
        finally:
            if not turn.done():  # timed out (or cancelled) while waiting: out of the line
                line.remove(turn)
                self._count -= 1
                if not line:
                    self._lines.pop(owner, None)
        if turn.done():
            return "ok"
        return "timeout"

    def leave(self, owner: str) -> None:
        """The worker is done with one of ``owner``'s calls: its slot goes to the next in line."""
        self._count -= 1
        line = self._lines.get(owner)
        if line:
            line.popleft().set_result(None)  # the slot passes on (in the pool: counted already)
            if not line:
                self._lines.pop(owner, None)
            return
        left = self._in_pool.get(owner, 0) - 1
        if left > 0:
            self._in_pool[owner] = left
        else:
            self._in_pool.pop(owner, None)

    def in_pool(self, owner: str) -> int:
        return self._in_pool.get(owner, 0)
