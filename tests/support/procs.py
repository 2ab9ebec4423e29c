"""Process and polling helpers shared by the real-process harness: free ports, readiness polling,
and processes that are always stopped (their whole process group) with their log at hand."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tests.support.ports import free_port, free_port_on, free_ports, port_open, wait_port_open

__all__ = ["Proc", "ProcessExited", "free_port", "free_port_on", "free_ports", "port_open", "stop_all", "wait_for", "wait_port_open"]

T = TypeVar("T")


class ProcessExited(AssertionError):
    """A process the test needs has exited. ``wait_for`` gives up at once instead of polling on."""


def wait_for(
    check: Callable[[], T],
    what: str | float = "condition",
    timeout: float | str = 30.0,
    interval: float = 0.05,
) -> T:
    """Polls ``check`` until it returns something truthy, and returns that.

    Exceptions raised by ``check`` count as "not yet", except ``ProcessExited`` (a process died:
    waiting longer cannot help), which propagates at once. On timeout: AssertionError naming ``what``
    with the last error or last falsy value. Both argument orders work:
    ``wait_for(check, "what", 10)`` and ``wait_for(check, 10, "what")``.
    """
    if isinstance(what, int | float) and not isinstance(what, bool):
        what, timeout = (timeout if isinstance(timeout, str) else "condition"), what
    assert isinstance(what, str) and isinstance(timeout, int | float), "wait_for(check, what, timeout)"
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last_value, last_exc = result, None
        except ProcessExited:
            raise
        except Exception as exc:  # noqa: BLE001 - polling: anything is "not yet"
            last_exc = exc
        if time.monotonic() > deadline:
            if last_exc is not None:
                detail = f" (last error: {last_exc!r})"
            else:
                shown = repr(last_value)
                detail = f" (last value: {shown[:500]}{'...' if len(shown) > 500 else ''})"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


_live: set[Proc] = set()
_live_lock = threading.Lock()


def stop_all() -> None:
    """Stops every Proc still running (a safety net for session end and interpreter exit)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        try:
            proc.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(stop_all)


class Proc:
    """A subprocess in its own process group (session), stdout and stderr appended to a log file.

    ``stop()`` sends SIGTERM to the whole group, then SIGKILL after ``timeout``; anything left in the
    group after the leader exits is killed too. The leader is reaped only after that, so its pid (the
    group id) cannot be reused by an unrelated process while we signal the group.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> Proc:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            command = " ".join(self.cmd).replace("\n", "\\n")
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {command}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self.env, cwd=self.cwd,
            )
        self.returncode = None
        with _live_lock:
            _live.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def _exit_status(self) -> int | None:
        """The leader's exit code if it has exited, without reaping it (None while running)."""
        assert self.popen is not None
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return self.popen.poll()
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    @property
    def running(self) -> bool:
        return self.popen is not None and self._exit_status() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def check_alive(self) -> None:
        """Raises ProcessExited (with the log tail) if the process was started and has exited."""
        if self.popen is None:
            return
        code = self._exit_status()
        if code is not None:
            raise ProcessExited(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def wait_for(self, check: Callable[[], T], what: str | float = "condition", timeout: float | str = 30.0,
                 interval: float = 0.05) -> T:
        """``wait_for`` that fails at once if this process died; a timeout carries its log tail.
        Either order: ``wait_for(check, "what", 10)`` or ``wait_for(check, 10, "what")``."""
        def guarded() -> T:
            self.check_alive()
            return check()

        try:
            return wait_for(guarded, what, timeout, interval)
        except ProcessExited as exc:  # already carries the log tail
            raise ProcessExited(f"{exc}\n(full log: {self.log_path})") from None
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ({self.log_path}) ---\n{self.log_tail()}") from None

    def _signal_group(self, sig: int) -> None:
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._exit_status() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout``; idempotent."""
        self._finish(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, no goodbye: as if the machine lost the process."""
        self._finish(signal.SIGKILL, 10.0)

    def _finish(self, sig: int, timeout: float) -> None:
        if self.popen is None:
            return
        try:
            if self._exit_status() is None:
                self._signal_group(sig)
                if not self._wait_exit(timeout) and sig != signal.SIGKILL:
                    self._signal_group(signal.SIGKILL)
                    self._wait_exit(timeout)
            # Stragglers in the group (children of the leader); the unreaped leader keeps the id ours.
            self._signal_group(signal.SIGKILL)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            self.returncode = self.popen.returncode
        finally:
            with _live_lock:
                _live.discard(self)
            self.popen = None
