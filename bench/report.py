"""Rewrites BENCHMARKS.md from the JSON results in bench/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy = subprocess.run([str(ROOT / ".venv/bin/envoy"), "--version"], capture_output=True, text=True).stdout.strip()
    envoy = envoy.split("version: ", 1)[-1].split("/")[1] if "/" in envoy else envoy
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, Envoy {envoy}"


def authz_section(r: dict) -> str:  # type: ignore[type-arg]
    e = r["envoy"]
    rows = []
    for variant, label in (("none", "no authorization"), ("ext_authz", "xdsd ext_authz"), ("rbac", "Envoy RBAC (in-process)")):
        for conc in ("c1", "c8"):
            x = e[variant][conc]
            rows.append(f"| {label} | {conc[1:]} | {x['rps']:,.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | {x['non_2xx']:.0f} |")
    s = r["servicer_alone"]
    c1 = e["ext_authz"]["c1"]
    return "\n".join([
        "## ext_authz (issue 6)",
        "",
        "Command: `.venv/bin/python -m bench.authz --seconds 10` (Envoy `--concurrency 1`, `wrk -t1`, closed loop).",
        "",
        "| filter | connections | requests/s | p50 µs | p99 µs | non-2xx |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| end to end with ext_authz, 1 connection ({c1['rps']:,.0f} rps) | p50 {c1['p50_us']:.0f} µs, p99 {c1['p99_us']:.0f} µs | p50 ≤ 300 µs, p99 ≤ 1 ms at 2,000 rps |",
        f"| policy evaluation alone (`AuthorizationServicer.decide`) | {r['eval']['decide_us']:.1f} µs | ≤ 20 µs |",
        f"| servicer alone, gRPC load, 16 in flight | {s['rps']:,.0f} rps, p50 {s['p50_us']:.0f} µs, p99 {s['p99_us']:.0f} µs | (OPA-Envoy: p99 4.6 ms at 1,000 rps) |",
        "",
    ])


def main() -> None:
    parts = ["# Benchmarks", "", f"Machine: {machine()}.", "",
             "Figures are rewritten by the benchmark commands below; each section names its command.", ""]
    authz = ROOT / "bench/results/authz.json"
    if authz.exists():
        parts.append(authz_section(json.loads(authz.read_text())))
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
