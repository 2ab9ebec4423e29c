"""Background work that must not die quietly: the file watch, the registry sweep, certificate
rotation, revocation checks. Each runs under a ``Supervisor``: an exception is logged, counted,
and the task is restarted after a backoff; a task that keeps failing for longer than
``unhealthy_after`` makes ``/readyz`` answer 503 with its name, and ``/debug/health`` shows each
task's state and last error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
UNHEALTHY_AFTER = 10.0  # seconds of failing before readiness goes
MAX_ERROR_TEXT = 500


@dataclass
class TaskHealth:
    name: str
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None  # since the first failure of the current run of failures
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "state": "failing" if self.failing_since is not None else "running",
                "failures": self.failures, "last_error": self.last_error, "last_error_at": self.last_error_at,
                "failing_since": self.failing_since}


class Supervisor:
    def __init__(self, stop: asyncio.Event, on_failure: Callable[[str], None] | None = None,
                 unhealthy_after: float = UNHEALTHY_AFTER) -> None:
        self.stop = stop
        self.on_failure = on_failure
        self.unhealthy_after = unhealthy_after
        self.tasks: dict[str, TaskHealth] = {}
        self._running: list[asyncio.Task[None]] = []

    def start(self, name: str, run: Callable[[], Awaitable[None]], *, healthy_after: float = 5.0) -> None:
        """Run ``run()`` until ``stop``; restart it (with backoff) whenever it raises or returns
        early. A run that lasts ``healthy_after`` seconds clears the task's failing state."""
        health = self.tasks[name] = TaskHealth(name)
        self._running.append(asyncio.create_task(self._supervise(health, run, healthy_after), name=name))

    def track(self, name: str) -> None:
        """Work that is not a task of its own (e.g. applying a registration) but reports its
        failures (``failed``) and successes (``ok``) here."""
        self.tasks.setdefault(name, TaskHealth(name))

    def ok(self, name: str) -> None:
        health = self.tasks.get(name)
        if health is not None:
            health.failing_since = None

    def failed(self, name: str, exc: BaseException) -> None:
        """Record a failure that the task handled itself (it keeps running)."""
        health = self.tasks.get(name)
        if health is None:
            return
        now = time.time()
        health.failures += 1
        text = f"{type(exc).__name__}: {exc}"
        health.last_error = text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."
        health.last_error_at = now
        if health.failing_since is None:
            health.failing_since = now
        if self.on_failure is not None:
            self.on_failure(name)

    async def _supervise(self, health: TaskHealth, run: Callable[[], Awaitable[None]], healthy_after: float) -> None:
        backoff = BACKOFF_FIRST
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            started = time.monotonic()
            # A run that survives this long is healthy again (its earlier failures are history).
            recovered = loop.call_later(healthy_after, self.ok, health.name)
            try:
                await run()
                if self.stop.is_set():
                    return
                raise RuntimeError("the task returned while xdsd is running")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point: log, count, restart
                log.exception("background task %r failed; restarting in %.1f s", health.name, backoff)
                self.failed(health.name, exc)
            finally:
                recovered.cancel()
            if time.monotonic() - started >= healthy_after:
                backoff = BACKOFF_FIRST
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    def unhealthy(self, now: float | None = None) -> list[str]:
        """Tasks that have been failing for longer than ``unhealthy_after``."""
        now = time.time() if now is None else now
        return sorted(h.name for h in self.tasks.values()
                      if h.failing_since is not None and now - h.failing_since > self.unhealthy_after)

    def status(self) -> list[dict[str, object]]:
        return [self.tasks[name].as_json() for name in sorted(self.tasks)]

    async def close(self) -> None:
        for task in self._running:
            task.cancel()
        for task in self._running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()
