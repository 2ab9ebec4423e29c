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
    variants = (("none", "no authorization"), ("ext_authz", "xdsd ext_authz, gRPC"),
                ("ext_authz_http", "xdsd ext_authz, HTTP (`--authz-http-port`)"), ("rbac", "Envoy RBAC (in-process)"))
    for variant, label in variants:
        if variant not in e:
            continue
        for conc in ("c1", "c8"):
            x = e[variant][conc]
            rows.append(f"| {label} | {conc[1:]} | {x['rps']:,.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | {x['non_2xx']:.0f} |")
    s = r["servicer_alone"]
    c1 = e["ext_authz"]["c1"]
    h1 = e.get("ext_authz_http", {}).get("c1")
    http_row = [] if h1 is None else [
        f"| end to end with ext_authz over HTTP, 1 connection ({h1['rps']:,.0f} rps) | p50 {h1['p50_us']:.0f} µs, "
        f"p99 {h1['p99_us']:.0f} µs | p50 ≤ 300 µs, p99 ≤ 1 ms at 2,000 rps |"]
    return "\n".join([
        "## ext_authz (issue 6)",
        "",
        f"Command: `.venv/bin/python -m bench.authz --seconds {r.get('seconds', 10)}` (Envoy `--concurrency 1`, `wrk -t1`, closed loop:",
        "with one connection each request waits for the previous one, so requests/s = 1 / latency; xdsd serves",
        "both transports from one process). The HTTP transport is what `xdsd bootstrap --authz-http-port` sets up;",
        "it meets the targets at more than twice the asked rate. gRPC stays for Envoys bootstrapped without it.",
        "One-connection rows are the median of three runs by p99 (the others are in bench/results/authz.json).",
        "",
        "| filter | connections | requests/s | p50 µs | p99 µs | non-2xx |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| measure | result | target |",
        "|---|---|---|",
        *http_row,
        f"| end to end with ext_authz over gRPC, 1 connection ({c1['rps']:,.0f} rps) | p50 {c1['p50_us']:.0f} µs, p99 {c1['p99_us']:.0f} µs | p50 ≤ 300 µs, p99 ≤ 1 ms at 2,000 rps |",
        f"| policy evaluation alone (`AuthorizationServicer.decide`) | {r['eval']['decide_us']:.1f} µs | ≤ 20 µs |",
        f"| servicer alone, gRPC load, 16 in flight | {s['rps']:,.0f} rps, p50 {s['p50_us']:.0f} µs, p99 {s['p99_us']:.0f} µs | (OPA-Envoy: p99 4.6 ms at 1,000 rps) |",
        *([] if "servicer_paced" not in r else [
            f"| servicer alone, gRPC at a fixed {r['servicer_paced']['rate']:,.0f} checks/s (open loop) | "
            f"p50 {r['servicer_paced']['p50_us']:.0f} µs, p99 {r['servicer_paced']['p99_us']:.0f} µs | "
            "well ahead of OPA-Envoy's p99 4.6 ms at 1,000 rps |"]),
        *([] if "http_alone" not in r else [
            f"| HTTP check server alone, 16 keep-alive connections | {r['http_alone']['rps']:,.0f} rps, "
            f"p50 {r['http_alone']['p50_us']:.0f} µs, p99 {r['http_alone']['p99_us']:.0f} µs | |"]),
        "",
    ])


def _ms(x: dict, key: str) -> str:  # type: ignore[type-arg]
    return f"{x[key]:,.0f}" if key in x else "–"


def xds_section(r: dict) -> str:  # type: ignore[type-arg]
    mode = r.get("mode", "quick")
    cmd = ".venv/bin/python -m bench.xds" + (" --full" if mode == "full" else "")
    lines = [
        "## xDS fan-out, convergence, memory, reconnect storms (issue 8)" + (" — full mode" if mode == "full" else ""),
        "",
        f"Command: `{cmd}` ({mode} mode; `make bench` runs the quick one). xdsd runs as `xdsd serve`",
        "(`--auth required`, real tokens); the streams come from `bench/loadgen.py` worker processes on the",
        "same 2-core machine (each stream its own HTTP/2 connection, half state of the world, half delta;",
        "each subscribes like a sidecar: CDS+LDS wildcard, EDS/RDS for what it received, SDS, and ACKs).",
        "Mesh: 100 services x 10 endpoints, every sidecar calls the changed service plus 4 others",
        "(`bench/meshgen.py`). A change is a registration over the HTTP API; the clock starts before",
        "the request, so the registration debounce (10 ms) is included. Times in ms.",
        "",
        "| scenario | streams | p50 | p99 | max | xdsd CPU s | peak RSS MB | longest loop stall ms | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in r.get("fleet", []):
        s, fo = f["storm"], f["fanout"]
        n = f"{f['n']:,}" + (f" ({s['missing']:,} never configured: load-generator streams failed, see the JSON)"
                             if s.get("missing") else "")
        lines.append(f"| reconnect storm: all of CDS, EDS, LDS, RDS ACKed | {n} | {_ms(s, 'p50')} | {_ms(s, 'p99')} | "
                     f"{_ms(s, 'max')} | {s['cpu_s']:.2f} | {s['peak_rss_mb']:.0f} | {s['loop_stall_ms']:.0f} | "
                     f"{'≤ 3,000 ms for 1,000' if f['n'] == 1000 else ''} |")
        lines.append(f"| fan-out: one endpoint change, every stream ACKed ({fo['changes']} changes) | {f['n']:,} | "
                     f"{_ms(fo, 'p50')} | {_ms(fo, 'p99')} | {_ms(fo, 'max')} | {fo['cpu_s_per_change']:.3f} per change | "
                     f"{fo['peak_rss_mb']:.0f} | {fo['loop_stall_ms']:.0f} | {'p99 ≤ 150 ms for 1,000' if f['n'] == 1000 else ''} |")
    if "large" in r:
        x = r["large"]
        lines.append(f"| 10,000-endpoint service, one endpoint changed | {x['streams']} | {_ms(x, 'p50')} | {_ms(x, 'p99')} | "
                     f"{_ms(x, 'max')} | {x['cpu_s_per_change']:.3f} per change | {x['peak_rss_mb']:.0f} | {x['loop_stall_ms']:.0f} | |")
    if "envoys" in r:
        x = r["envoys"]
        lines.append(f"| {x['envoys']} real Envoys: change until every one routes to the new endpoint | {x['envoys']} | "
                     f"{_ms(x, 'p50')} | {_ms(x, 'p99')} | {_ms(x, 'max')} | {x['cpu_s_per_change']:.3f} per change | | "
                     f"{x['loop_stall_ms']:.0f} | |")
    lines += ["", "| measure | result | target |", "|---|---|---|"]
    for f in r.get("fleet", []):
        m = f["memory"]
        lines.append(f"| RSS per idle stream, {m['streams']:,} streams ({m['rss_before_mb']:.0f} → {m['rss_after_mb']:.0f} MB, "
                     f"the config of every role they hold included) | {m['per_stream_kib']:.0f} KiB | "
                     f"{'≤ 64 KiB' if m['streams'] >= 1000 else '(one stream per role here: the roles config dominates)'} |")
    fleet = r.get("fleet", [])
    if len(fleet) >= 2:
        a, b = fleet[0]["memory"], fleet[-1]["memory"]
        slope = (b["rss_after_mb"] - a["rss_after_mb"]) * 1024 / (b["streams"] - a["streams"])
        lines.append(f"| RSS per additional idle stream, {a['streams']:,} → {b['streams']:,} streams (every role's "
                     f"config already built, so this is the stream alone) | {slope:.0f} KiB | ≤ 64 KiB |")
    if "large" in r:
        x = r["large"]
        lines.append(f"| 10,000-endpoint service: new snapshot ready (generate + serialize, `xdsd_snapshot_build_seconds`) | "
                     f"{x['build_ms']:.1f} ms | ≤ 1 ms |")
        lines.append(f"| 10,000-endpoint service: EDS bytes per stream per change | {x['eds_bytes_per_stream_per_change']:,.0f} | |")
    for d in r.get("delta", []):
        e, c = d["endpoint_change_bytes"], d["cluster_change_bytes"]
        share = c["delta"] / c["sotw"] * 100 if c.get("sotw") else 0.0
        lines.append(f"| {d['clusters']:,} clusters (a gateway holding all): one-endpoint change, bytes SotW / delta | "
                     f"{e['sotw']:,.0f} / {e['delta']:,.0f} | |")
        lines.append(f"| {d['clusters']:,} clusters: one-cluster change (CDS is full-state), bytes SotW / delta | "
                     f"{c['sotw']:,.0f} / {c['delta']:,.0f} ({share:.2f}%) | delta ≤ 1% of SotW |")
        lines.append(f"| {d['clusters']:,} clusters: xdsd CPU per endpoint change (snapshot build) | "
                     f"{d['cpu_ms_per_endpoint_change']:.0f} ms ({d['build_ms']:.0f} ms) | flat as clusters grow |")
    lines += ["", f"Whole run: {r.get('seconds', 0):.0f} s.", ""]
    if mode == "full":
        lines += [
            "At 5,000 streams the load generator (four processes) and xdsd share two cores; the storm and",
            "fan-out figures there measure that sharing as much as xdsd (no target is set for 5,000). With",
            "grpcio on both sides the same run took 85 s for the storm and a fifth of the client streams",
            "failed inside grpcio; every stream is configured now.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "How the numbers were made good (see the commits for before/after):",
        "- Generation runs once per revision for all groups: per-service resources are memoized by object",
        "  identity (`xdsd/generators/memo.py`), each message is serialized once (`cache.snapshot.Encoder`),",
        "  a group's snapshot is patched against its previous one (only changed positions re-encoded; type",
        "  versions are order-independent sums of resource hashes), so an endpoint change rebuilds one",
        "  ClusterLoadAssignment. 100 groups: 60 ms → 9 ms per change; a gateway holding 5,000 clusters:",
        "  55 ms → ~6 ms in process.",
        "- Assignments of >= 256 endpoints are encoded to wire bytes in 128-endpoint chunks reused while",
        "  they hold the same objects (`xdsd/generators/encoded.py`): one change in a 10,000-endpoint",
        "  service went from 47 ms to ~2 ms in process (the table's figure is measured inside `xdsd serve`",
        "  while 200 streams download 270 KB each on the other core).",
        "- A revision that only changes registered endpoints patches each group's last output: only the",
        "  changed services' assignments (subsets included) are rebuilt, and streams up to date with the",
        "  previous snapshot look only at the names that changed, so per-change work follows the changed",
        "  services, not the clusters a group holds (build 18 ms → <1 ms at 10,000 clusters; a randomized",
        "  test checks patched == regenerated).",
        "- ACKs that repeat a subscription do not wake their stream (for large SotW subscriptions the",
        "  repeat is recognized byte for byte); a stream settled on the current snapshot does nothing; a",
        "  revision wakes streams in batches of ~8 ms of work per loop iteration; a group's first snapshot",
        "  in a reconnect storm is built in a queued pass (at most 4 ms of building per iteration).",
        "- The cyclic GC stopped the loop for up to 140 ms with 1,000 streams; the start-up heap is frozen",
        "  and the young generation collected less often (worst pause now ~25 ms, visible in `/debug/loop`).",
        "- The xDS port is served by `xdsd/transport` (gRPC on h2, run by the event loop) instead of",
        "  grpcio's asyncio server, which spent ~100 µs of CPU per streamed message handing completions",
        "  between its poller thread and the loop (a bare grpc.aio server writing one message to 1,000",
        "  streams and reading one back: ~100 ms of CPU; the same on h2: ~47 ms). The load generator's",
        "  streams are a minimal h2 gRPC client too (`bench/h2grpc.py`): as grpc.aio channels they spent",
        "  ~190 ms of CPU per 1,000-stream fan-out on the same two cores as xdsd, more than xdsd itself.",
        "  Fan-out to 1,000 streams, p99: 190–230 ms → 75–135 ms; xdsd CPU per change 140–170 → 65–85 ms.",
        "  The 10,000-endpoint scenario's latency now includes Python parsing 270 KB per stream in the",
        "  load generator (with the same client, the h2 server beats grpcio's: p99 168 vs 208 ms).",
        "- Reads have a budget of 4 ms per loop iteration across connections (`transport.server.ReadBudget`):",
        "  a reconnect storm's first requests (HPACK, node tokens) had held the loop 55–60 ms; now 20–26 ms.",
        "- `xdsd serve --xds-transport grpcio` keeps grpcio's server; with it the figures above are the",
        "  older ones (see git history of this file).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parts = ["# Benchmarks", "", f"Machine: {machine()}.", "",
             "Figures are rewritten by the benchmark commands below; each section names its command.", ""]
    authz = ROOT / "bench/results/authz.json"
    if authz.exists():
        parts.append(authz_section(json.loads(authz.read_text())))
    for name in ("xds.json", "xds-full.json"):
        xds = ROOT / "bench/results" / name
        if xds.exists():
            parts.append(xds_section(json.loads(xds.read_text())))
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
