"""``python -m tests.support.reaper CMD [ARGS...]``: run CMD so that nothing it starts outlives it.

This process makes itself a child subreaper (Linux ``prctl``): a process CMD starts keeps this one as
an ancestor even if it moves to its own session (as ``demo/local_mesh.py`` does for each Envoy) or
is orphaned. When CMD exits, whatever it left running is stopped (SIGTERM, SIGKILL after a grace
period) and named on stderr (``reaper: ...``). On SIGTERM/SIGINT (which ``Proc.stop`` sends to the
whole process group, CMD included), CMD gets ``--grace`` seconds to stop its own processes, then is
killed, and the sweep follows. Exit status: CMD's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
GRACE = 30.0  # seconds CMD gets to stop after a stop request; keep below Proc.stop's timeout


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (what ``ps`` reads)."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields after its last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":  # zombies are reaped below, not signalled
            out[int(entry)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    parents = _parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(grace: float = 5.0) -> list[str]:
    """Stops every descendant of this process; returns what was left running."""
    left = descendants(os.getpid())
    named = [f"{pid} {_cmdline(pid)}" for pid in left]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap()
            left = descendants(os.getpid())
            if not left:
                return named
            time.sleep(0.05)
    _reap()
    return named


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.support.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl failed (errno {ctypes.get_errno()}); orphans may escape", file=sys.stderr)
    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    child = subprocess.Popen(argv)
    code: int | None = None
    kill_at: float | None = None
    while code is None:
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if stop_requested and kill_at is None:
                kill_at = time.monotonic() + GRACE
            elif kill_at is not None and time.monotonic() > kill_at:
                print(f"reaper: {argv[0]} did not stop within {GRACE}s; killing it", file=sys.stderr, flush=True)
                child.kill()
                kill_at = float("inf")
    left = sweep()
    if left:
        print(f"reaper: stopped {len(left)} processes left running: " + "; ".join(left), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
