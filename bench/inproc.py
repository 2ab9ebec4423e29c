"""``xdsd serve`` (the real App, xdsd.app.run_serve) in this process, with instruments that a
separate profiler cannot give: tracemalloc snapshots and cProfile call counts.

    python -m bench.inproc --snapshots DIR [--tracemalloc FRAMES] [--cprofile] serve --config ... (xdsd's flags)

Signals (the benchmark driver sends them):
  SIGUSR1  write ``DIR/snap-<k>.json``: RSS, gc counts and what a full ``gc.collect()`` finds
           (collectable cycles nobody collected), and with ``--tracemalloc`` a pickled tracemalloc
           snapshot ``DIR/snap-<k>.tracemalloc`` (taken before the collection)
  SIGUSR2  with ``--cprofile``: the first starts profiling, the second stops it and writes
           ``DIR/cprofile.pstats``
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", type=Path, required=True)
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    p.add_argument("--cprofile", action="store_true")
    ours, rest = p.parse_known_args(argv)
    out: Path = ours.snapshots
    out.mkdir(parents=True, exist_ok=True)
    if ours.tracemalloc:
        tracemalloc.start(ours.tracemalloc)
    taken = 0

    def snapshot(_sig: int, _frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        started = time.monotonic()
        info: dict[str, object] = {"rss": _rss(), "gc_count": gc.get_count(), "gc_stats": gc.get_stats(),
                                   "gc_threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                                   "objects": len(gc.get_objects())}
        if ours.tracemalloc:
            tracemalloc.take_snapshot().dump(str(out / f"snap-{taken}.tracemalloc"))
            info["traced"] = tracemalloc.get_traced_memory()
        info["collected"] = gc.collect()  # what the collector had left behind (unreachable cycles)
        info["rss_after_collect"] = _rss()
        info["objects_after_collect"] = len(gc.get_objects())
        if ours.tracemalloc:
            info["traced_after_collect"] = tracemalloc.get_traced_memory()
            tracemalloc.take_snapshot().dump(str(out / f"snap-{taken}-collected.tracemalloc"))
        info["seconds"] = time.monotonic() - started
        (out / f"snap-{taken}.json").write_text(json.dumps(info))

    profile = cProfile.Profile() if ours.cprofile else None
    profiling = False

    def toggle(_sig: int, _frame: FrameType | None) -> None:
        nonlocal profiling
        assert profile is not None
        if not profiling:
            profiling = True
            profile.enable()
        else:
            profile.disable()
            profiling = False
            profile.dump_stats(str(out / "cprofile.pstats"))
            (out / "cprofile.done").write_text("1")

    signal.signal(signal.SIGUSR1, snapshot)
    if profile is not None:
        signal.signal(signal.SIGUSR2, toggle)

    from xdsd.cli import build_parser

    args = build_parser().parse_args(rest)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
