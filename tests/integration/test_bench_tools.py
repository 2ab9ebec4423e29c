"""The benchmark tools measure something real: the load generator's sidecar-like streams get fully
configured by a real ``xdsd serve`` and see a registration fan out; xdsd reports its loop health."""

from __future__ import annotations

import time
from pathlib import Path

from bench import meshgen
from bench.loadgen import LoadGenerator
from bench.xds import Target, summary
from xdsd import typeurls

READY = [typeurls.short(t) for t in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE)]
EDS = typeurls.short(typeurls.ENDPOINT)


def test_loadgen_streams_are_configured_and_see_a_change(tmp_path: Path) -> None:
    mesh = meshgen.mesh(10, 2, upstreams=3)
    with Target(mesh, tmp_path) as t, LoadGenerator(t.target, 1) as lg:
        specs = t.specs(20, meshgen.client_services(mesh))
        assert sum(s.delta for s in specs) == 10  # half delta, half state of the world
        ready, errors = lg.connect(specs, timeout=60)
        assert errors == []
        assert all(r is not None for r in ready), ready
        proxies = t.xdsd.proxies()
        assert len(proxies) == 20
        assert all(node["types"][typ]["state"] == "SYNCED" for node in proxies for typ in READY)

        builds_before = t.metric_sum_count("xdsd_snapshot_build_seconds")[1]
        t0 = time.monotonic()
        t.register(meshgen.service_name(0), "10.200.0.1", meshgen.INBOUND_PORT, "extra")
        got, errors = lg.since(t0, timeout=30)
        assert errors == []
        stats = summary(got)
        assert stats["n"] == 20 and stats["missing"] == 0, stats
        assert t.metric_sum_count("xdsd_snapshot_build_seconds")[1] > builds_before
        # Every stream got the new endpoint: xdsd's view agrees (all SYNCED again).
        t.xdsd.wait_for(lambda: all(n["types"][EDS]["state"] == "SYNCED" for n in t.xdsd.proxies()),
                        "all streams ACK the new assignment", 30)

        # xdsd reports its loop health (how long the stalls were is a figure for bench/, not here).
        loop = t.xdsd.admin_get_json("/debug/loop?reset=1")
        assert isinstance(loop["max_stall_seconds"], float) and loop["max_stall_seconds"] >= 0.0
        assert isinstance(loop["max_gc_seconds"], float) and loop["max_gc_seconds"] >= 0.0
        # ?reset=1 starts a new window: the next answer covers only the time since.
        assert t.xdsd.admin_get_json("/debug/loop")["since"] >= loop["until"]
