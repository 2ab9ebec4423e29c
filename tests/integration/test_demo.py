"""Smoke test: `make demo` (demo/local_mesh.py) runs end to end and reports what it showed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_reports_the_weighted_split() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "demo" / "local_mesh.py")], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    first = re.search(r"weights 3:1.*reviews-v1: (\d+) \(([\d.]+)%\)", out)
    assert first and 70.0 <= float(first.group(2)) <= 80.0, out
    assert "invalid edit refused: services.reviews.endpoints[1].port" in out
    assert "CDS SYNCED, EDS SYNCED, LDS SYNCED, RDS SYNCED" in out
    assert "stopping everything" in out
