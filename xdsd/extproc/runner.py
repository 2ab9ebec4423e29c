"""Where processors run: a pool of worker threads, never the event loop that serves xDS.

A call that exceeds its timeout is answered at once (by the caller's failure mode) and its thread
is asked to stop: an exception (``ProcessorTimeout``) is raised in it at its next Python
instruction. Code blocked inside a C call (``time.sleep``, a socket read) only sees it when that
call returns, holding its worker meanwhile; calls queued behind busy workers count against their
own timeout, so a pool full of stuck processors turns into failure-mode answers, not into a stalled
control plane."""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

# Processors run CPU-bound Python under the GIL: more threads than this add queueing on the GIL,
# which the event loop shares, rather than throughput (see BENCHMARKS.md, "External processing").
DEFAULT_WORKERS = 4


class ProcessorTimeout(BaseException):
    """Raised inside a processor's thread when its call timed out (a BaseException, so that a
    processor's ``except Exception`` does not swallow it)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["ok", "error", "timeout"]
    value: Any  # the result (ok) or the exception (error)
    seconds: float


class Runner:
    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started on first use

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xdsd-processor")
        return self._pool

    async def run(self, work: Callable[[], Any], timeout: float) -> Outcome:
        """``work()`` in a worker thread, at most ``timeout`` seconds from now (queueing included)."""
        start = time.perf_counter()
        call = _Call(work)
        submitted = self._executor().submit(call)
        future = asyncio.wrap_future(submitted)
        try:
            value = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            future.add_done_callback(_consume)
            if not submitted.cancel():  # already running: interrupt it
                call.interrupt()
            return Outcome("timeout", None, time.perf_counter() - start)
        except Exception as exc:  # the processor raised
            return Outcome("error", exc, time.perf_counter() - start)
        return Outcome("ok", value, time.perf_counter() - start)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class _Call:
    """One call in a worker thread, interruptible once (``interrupt`` from the loop's thread)."""

    __slots__ = ("lock", "thread", "work", "done")

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.lock = threading.Lock()
        self.thread: int | None = None
        self.done = False

    def __call__(self) -> Any:
        try:
            with self.lock:
                self.thread = threading.get_ident()
            try:
                value = self.work()
            finally:
                with self.lock:  # from here on, interrupt() does nothing
                    self.done = True
            return value
        except ProcessorTimeout:  # interrupted: the caller has answered already
            return None

    def interrupt(self) -> None:
        with self.lock:
            if self.thread is not None and not self.done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread),
                                                           ctypes.py_object(ProcessorTimeout))


def _consume(future: asyncio.Future[Any]) -> None:
    """A timed-out call's late result or error is dropped (and not reported as never retrieved)."""
    if not future.cancelled():
        future.exception()
