"""Where xdsd's CPU goes: py-spy samples of a running ``xdsd serve`` summarized by function, by
line and by package; and CPU pinning for the benchmarks (xdsd on one core, its clients on the other).

    with PySpy(pid, out_path) as spy:       # py-spy record --nonblocking (xdsd is not paused)
        ... the scenario ...
    summary = spy.summary()                 # shares of the samples (only samples of a busy thread)

py-spy comes from PyPI (``pip install py-spy``); without it ``PySpy.available()`` is False and the
profile scenarios are skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Package of a frame's file, most specific first.
PACKAGES = (
    ("xdsd/transport/", "xdsd.transport"), ("xdsd/server/", "xdsd.server"), ("xdsd/cache/", "xdsd.cache"),
    ("xdsd/generators/", "xdsd.generators"), ("xdsd/", "xdsd (other)"), ("/h2/", "h2"), ("/hpack/", "hpack"),
    ("/hyperframe/", "hyperframe"), ("google/protobuf", "protobuf"), ("/grpc/", "grpc"), ("/asyncio/", "asyncio"),
    ("uvloop", "uvloop"), ("/aiohttp/", "aiohttp"), ("/prometheus_client/", "prometheus_client"),
    ("/logging/", "logging"),
)


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Every thread of ``pid`` to ``cpus`` (threads made later inherit their creator's affinity)."""
    if not cpus:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def split_cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(xdsd's CPUs, everyone else's): core 0 for xdsd, the rest for the clients; None, None on one core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[:1]), frozenset(cpus[1:])


def py_spy() -> str | None:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


class PySpy:
    def __init__(self, pid: int, out: Path, rate: int = 250, cpus: frozenset[int] | None = None) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out = out
        self.rate = rate
        self.log = out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out),
                 "--nonblocking"], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    @staticmethod
    def available() -> bool:
        return py_spy() is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PySpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self, top: int = 25) -> dict[str, Any]:
        return summarize(self.out.read_text() if self.out.exists() else "", self.rate, top)


def _package(frame: str) -> str:
    for needle, name in PACKAGES:
        if needle in frame:
            return name
    return "other"


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py:123)``; ``line=False`` drops the line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({tail})"


def _no_line(frame: str) -> str:
    head, sep, tail = frame.rpartition(":")
    return head + ")" if sep and tail.rstrip(")").isdigit() else frame


def summarize(raw: str, rate: int, top: int = 25) -> dict[str, Any]:
    """Shares (percent of the samples) by leaf function ("self"), by function anywhere on the stack
    ("inclusive"), by leaf line, and by the package of the leaf frame; samples/rate = busy seconds."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    pkg_incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_line[_short(leaf)] += n
        self_fn[_no_line(_short(leaf))] += n
        pkg[_package(leaf)] += n
        for f in {_no_line(_short(f)) for f in frames}:
            incl_fn[f] += n
        for p in {_package(f) for f in frames}:
            pkg_incl[p] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "busy_seconds": total / rate, "self": share(self_fn), "inclusive": share(incl_fn),
            "lines": share(self_line), "packages_self": share(pkg), "packages_inclusive": share(pkg_incl)}
