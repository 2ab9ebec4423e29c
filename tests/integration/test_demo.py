"""Smoke test: `make demo` (demo/local_mesh.py) runs the loopback mesh end to end and reports it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_the_mesh_and_reports_what_it_observed() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "demo" / "local_mesh.py")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "productpage was called by spiffe://demo.local/gateway/edge" in out
    assert "reviews was called by spiffe://demo.local/service/productpage" in out
    assert re.search(r"reviews-v2\) received traffic [\d.]+s after", out)
    split = re.search(r"v1 (\d+) \(([\d.]+)%\), v2 (\d+)", out)
    assert split and 70.0 <= float(split.group(2)) <= 80.0, out
    assert "x-canary: yes went to {'v2': 40}" in out, out
    assert "GET /ratings/1: 200; GET /admin: 403" in out
    retried = re.search(r"retries: .* (\d+) of 300 requests through the gateway succeeded", out)
    assert retried and int(retried.group(1)) >= 295, out
    assert "an invalid edit was refused" in out
    assert re.search(r"demo: 5 of 5 proxies fully SYNCED; stopping everything", out), out
