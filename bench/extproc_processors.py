"""Processors for bench.extproc, loaded by xdsd as ``bench.extproc_processors:<name>``."""

from __future__ import annotations

import time

from xdsd.processing import Continue, Message, Result


def spin(message: Message) -> Result:
    """Holds a worker (and the GIL) for ``args.ms`` milliseconds of pure-Python work."""
    deadline = time.perf_counter() + float(message.args.get("ms", 2)) / 1000
    while time.perf_counter() < deadline:
        sum(range(200))
    return Continue()
