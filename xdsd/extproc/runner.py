"""Where processors run: never on the event loop that serves xDS and ext_authz.

``ThreadRunner``: a pool of worker threads in xdsd's process. A call that exceeds its timeout is
answered at once (by the caller's failure mode) and its thread is interrupted: ``ProcessorTimeout``
is raised in it at its next Python instruction (code blocked inside a C call, such as
``time.sleep``, sees it only when that call returns). Processors share the GIL with the loop.

``ProcessRunner``: a pool of worker processes (spawned, so they inherit nothing of the running
server). Each builds the processors it is asked to run; each phase crosses a pipe as bytes. A call
is ended at its deadline by SIGALRM in the worker (which also interrupts sleeps and most blocking
calls); a worker that dies is replaced. A CPU-bound processor does not compete with the loop.

With either, calls queued behind busy workers count against their own timeout: a pool full of
stuck processors turns into failure-mode answers, never into a stalled control plane."""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from xdsd.extproc.phase import ProcessorTimeout, StepSpec, StreamState, init_worker, process, remote_phase
from xdsd.processing.api import Message, Phase

DEFAULT_THREADS = 4
DEFAULT_PROCESSES = 2
# How much longer than a call's timeout the parent waits for a worker process's own answer.
BACKSTOP_SECONDS = 0.05
# The longest a request waits for worker processes that are still starting.
WARM_UP_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["ok", "error", "timeout", "overloaded"]  # overloaded: refused by the admission, not run
    value: Any  # ok: (ProcessingResponse, StreamState); error: the exception
    seconds: float


class RemoteError(Exception):
    """A processor raised in a worker process (its text; the traceback is in ``details``)."""

    def __init__(self, text: str, details: str) -> None:
        super().__init__(text)
        self.details = details


# Called once the pool is done with a call (the admission's ``leave``).
Free = Callable[[], None]


class Runner(Protocol):
    workers: int

    async def phase(self, run: Callable[[Message], Any], spec: StepSpec, stream: StreamState, phase: Phase,
                    request: ep.ProcessingRequest, timeout: float, free: Free | None = None) -> Outcome:
        """One phase, answered within ``timeout``; ``free()`` is called once, on the loop, when the
        pool is done with the call (which may be after the answer: a timed-out call still running)."""
        ...

    def close(self) -> None: ...


class ThreadRunner:
    def __init__(self, workers: int = DEFAULT_THREADS) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started on first use

    async def phase(self, run: Callable[[Message], Any], spec: StepSpec, stream: StreamState, phase: Phase,
                    request: ep.ProcessingRequest, timeout: float, free: Free | None = None) -> Outcome:
        return await self.run(lambda: (process(run, spec, stream, phase, request), stream), timeout, free)

    async def run(self, work: Callable[[], Any], timeout: float, free: Free | None = None) -> Outcome:
        """``work()`` in a worker thread, at most ``timeout`` seconds from now (queueing included)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xdsd-processor")
        start = time.perf_counter()
        call = _Call(work)
        try:
            submitted = self._pool.submit(call)
        except BaseException:
            if free is not None:
                free()
            raise
        if free is not None:
            _when_done(submitted, free)
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


class ProcessRunner:
    def __init__(self, workers: int = DEFAULT_PROCESSES) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._warming: list[Future[Any]] = []

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker)
        return self._pool

    def start(self) -> list[Future[Any]]:
        """Spawn the workers now (a mesh with processing steps), not on the first request. A spawn
        takes a second or more; requests that come meanwhile wait for it before their timeout starts."""
        if self._pool is not None:  # already running
            return []
        pool = self._executor()
        self._warming = [pool.submit(time.sleep, 0.01) for _ in range(self.workers)]
        return self._warming

    async def ready(self) -> None:
        """Until the workers ``start`` spawned answer (at most ``WARM_UP_SECONDS``)."""
        warming, self._warming = self._warming, []
        pending = [asyncio.wrap_future(f) for f in warming if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=WARM_UP_SECONDS)

    async def phase(self, run: Callable[[Message], Any], spec: StepSpec, stream: StreamState, phase: Phase,
                    request: ep.ProcessingRequest, timeout: float, free: Free | None = None) -> Outcome:
        start = time.perf_counter()
        try:
            if self._warming:
                await self.ready()
            pool = self._executor()
            submitted = pool.submit(remote_phase, spec, stream, phase, request.SerializeToString(),
                                    time.time() + timeout)
        except BrokenProcessPool as exc:
            if free is not None:
                free()
            self._replace(pool)
            return Outcome("error", exc, time.perf_counter() - start)
        except BaseException:
            if free is not None:
                free()
            raise
        if free is not None:
            _when_done(submitted, free)
        future = asyncio.wrap_future(submitted)
        try:
            kind, a, b = await asyncio.wait_for(asyncio.shield(future), timeout + BACKSTOP_SECONDS)
        except TimeoutError:
            future.add_done_callback(_consume)
            submitted.cancel()
            return Outcome("timeout", None, time.perf_counter() - start)
        except BrokenProcessPool as exc:  # a worker died (os._exit, a crash in C): start new ones
            self._replace(pool)
            return Outcome("error", exc, time.perf_counter() - start)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not submitted.cancelled() or (task is not None and task.cancelling()):
                raise  # this call itself was cancelled (its stream ended)
            # the pool was shut down (replaced after a breakage, or closed) before running it
            return Outcome("error", BrokenProcessPool("the worker pool was replaced before this call ran"),
                           time.perf_counter() - start)
        except Exception as exc:
            return Outcome("error", exc, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        if kind == "ok":
            return Outcome("ok", (ep.ProcessingResponse.FromString(a), b), seconds)
        if kind == "timeout":
            return Outcome("timeout", None, seconds)
        return Outcome("error", RemoteError(a, b), seconds)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """New workers for ``broken``, once: every call that was in flight on a broken pool sees
        BrokenProcessPool; only the first replaces it (the others find it replaced already)."""
        if self._pool is not broken:
            return
        self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def close(self) -> None:
        old, self._pool = self._pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)


def make_runner(kind: str, workers: int | None = None) -> ThreadRunner | ProcessRunner:
    if kind == "processes":
        return ProcessRunner(workers or DEFAULT_PROCESSES)
    return ThreadRunner(workers or DEFAULT_THREADS)


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


def _when_done(submitted: Future[Any], free: Free) -> None:
    """``free()`` on this loop once the pool is done with ``submitted`` (ran, failed or cancelled)."""
    loop = asyncio.get_running_loop()

    def done(_: Future[Any]) -> None:  # in the worker pool's thread, or here when already done
        try:
            loop.call_soon_threadsafe(free)
        except RuntimeError:  # the loop is closed: nothing left to free
            pass

    submitted.add_done_callback(done)


def _consume(future: asyncio.Future[Any]) -> None:
    """A timed-out call's late result or error is dropped (and not reported as never retrieved)."""
    if not future.cancelled():
        future.exception()
