"""Smoke test: `make demo` (demo/local_mesh.py) runs the loopback mesh end to end and reports it,
and stops everything it started: the demo runs under tests.support.reaper, which finds every
process the demo leaves behind (its Envoys run in their own sessions) and stops it, also when the
demo times out or fails."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.support.procs import Proc, wait_for
from tests.support.stats import binomial_bounds
from tests.support.xdsd_proc import ROOT


def test_demo_runs_the_mesh_and_reports_what_it_observed(tmp_path: Path) -> None:
    demo = Proc("demo", [sys.executable, "-m", "tests.support.reaper", sys.executable, str(ROOT / "demo" / "local_mesh.py")],
                tmp_path / "demo.log", cwd=ROOT).start()
    try:
        wait_for(lambda: not demo.running, "the demo to finish", 300)
    finally:
        demo.stop(timeout=60)  # SIGTERM: the demo stops its processes; the reaper stops what it left
    out = demo.log_text()
    assert demo.returncode == 0, out
    assert "reaper: " not in out, out  # the demo stopped every process it started, by itself
    assert "productpage was called by spiffe://demo.local/gateway/edge" in out
    assert "reviews was called by spiffe://demo.local/service/productpage" in out
    assert re.search(r"reviews-v2\) received traffic [\d.]+s after", out)
    split = re.search(r"v1 (\d+) \(([\d.]+)%\), v2 (\d+)", out)
    assert split and 70.0 <= float(split.group(2)) <= 80.0, out  # weighted round robin 3:1 over 400
    assert "x-canary: yes went to {'v2': 40}" in out, out
    assert "GET /ratings/1: 200; GET /admin: 403" in out
    # 30% of reviews' answers fail at random; a request fails only if all 5 attempts do.
    retried = re.search(r"retries: .* (\d+) of 300 requests through the gateway succeeded", out)
    _, most_failures = binomial_bounds(300, 0.3**5)
    assert retried and int(retried.group(1)) >= 300 - most_failures, out
    assert ("end users: GET /account without a token: 401 (Jwt is missing); with alice's JWT: productpage saw "
            "x-user: alice; x-user sent by a client without a token: removed") in out, out
    assert "an invalid edit was refused" in out
    assert re.search(r"demo: 5 of 5 proxies fully SYNCED; stopping everything", out), out
