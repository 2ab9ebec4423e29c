"""One node group's generation failure fails that group's streams, not the revision; background
work is supervised (logged, counted, restarted, shown on /readyz)."""

from __future__ import annotations

import asyncio
import time

import pytest

from xdsd.cache import SnapshotCache
from xdsd.cache.cache import GroupFailed
from xdsd.generators import generate
from xdsd.model import load_mesh
from xdsd.node import NodeGroup
from xdsd.supervise import Supervisor

MESH = """
gateways:
  edge: {listen: {address: 127.0.0.1, port: 10000}, routes: [{prefix: /, service: reviews}]}
  other: {listen: {address: 127.0.0.1, port: 10001}, routes: [{prefix: /, service: reviews}]}
services:
  reviews: {endpoints: [{address: 10.0.0.1, port: 8080}]}
"""


def _poisoned(mesh, group):  # type: ignore[no-untyped-def]
    if group.cluster == "other":
        raise ValueError("poison")
    return generate(mesh, group)


def test_a_failing_group_does_not_stop_the_revision() -> None:
    cache = SnapshotCache(_poisoned)
    good, bad = NodeGroup("edge"), NodeGroup("other")
    seen: list[object] = []
    failures: list[Exception] = []
    cache.watch(good, lambda snap, types: seen.append(snap.revision))
    cache.watch(bad, lambda snap, types: seen.append("bad"), failures.append)
    cache.update(load_mesh(MESH))
    assert seen == [1] and len(failures) == 1 and "poison" in cache.failed[bad]
    with pytest.raises(GroupFailed, match="poison"):
        cache.snapshot(bad)
    cache.update(load_mesh(MESH.replace("10.0.0.1", "10.0.0.2")))  # the next revision is served too
    assert seen == [1, 2] and len(failures) == 3
    assert cache.snapshot(good) is not None


async def test_supervised_task_is_restarted_and_reported() -> None:
    stop = asyncio.Event()
    failures: list[str] = []
    sup = Supervisor(stop, on_failure=failures.append, unhealthy_after=0.0)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"boom {runs}")
        await stop.wait()

    sup.start("flaky", flaky, healthy_after=0.2)
    deadline = time.monotonic() + 10
    await _until(lambda: runs >= 3, deadline)
    assert runs == 3 and failures == ["flaky", "flaky"]
    status = sup.status()[0]
    assert status["failures"] == 2 and "boom 2" in str(status["last_error"])
    assert sup.unhealthy() == ["flaky"]  # failing since its first failure, not yet healthy again
    await _until(lambda: not sup.unhealthy(), deadline)
    assert sup.unhealthy() == []  # survived healthy_after
    stop.set()
    await sup.close()


async def _until(check, deadline: float) -> None:  # type: ignore[no-untyped-def]
    """Polls ``check`` (a bounded wait: the supervisor's restarts run on timers)."""
    for _ in range(10_000):
        if check() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)
