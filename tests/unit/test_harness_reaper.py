"""tests.support.reaper: nothing a command starts outlives it, even in its own session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.procs import Proc, wait_for
from tests.support.xdsd_proc import ROOT

LEAVES_ONE_BEHIND = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "print('orphan', p.pid, flush=True)\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _orphan_pid(proc: Proc) -> int:
    line = wait_for(lambda: next((x for x in proc.log_text().splitlines() if x.startswith("orphan ")), None),
                    "the orphan's pid", 30)
    return int(line.split()[1])


def test_what_a_command_leaves_running_is_stopped_and_named(tmp_path: Path) -> None:
    proc = Proc("reaped", [sys.executable, "-m", "tests.support.reaper", sys.executable, "-c", LEAVES_ONE_BEHIND],
                tmp_path / "reaped.log", cwd=ROOT).start()
    orphan = _orphan_pid(proc)
    wait_for(lambda: not proc.running, "the reaper to exit", 30)
    proc.stop()
    assert proc.returncode == 0
    assert not _alive(orphan)
    assert f"reaper: stopped 1 processes left running: {orphan} " in proc.log_text()


def test_a_stop_request_reaches_the_command_and_then_the_sweep(tmp_path: Path) -> None:
    script = LEAVES_ONE_BEHIND + "time.sleep(600)\n"
    proc = Proc("reaped", [sys.executable, "-m", "tests.support.reaper", sys.executable, "-c", script],
                tmp_path / "reaped.log", cwd=ROOT).start()
    orphan = _orphan_pid(proc)
    assert os.getpgid(orphan) != proc.pid  # out of reach of a signal to the group
    proc.stop(timeout=60)
    assert not _alive(orphan)
    assert "reaper: stopped 1 processes" in proc.log_text()
