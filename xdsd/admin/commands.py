"""``xdsd diff``, ``apply``, ``history`` and ``rollback``: changing the mesh through the running xdsd.

``apply`` is the documented way to change the mesh: it validates locally, shows the diff, has xdsd
write the content over its mesh file atomically, and waits until every connected proxy has ACKed or
NACKed the new revision. Exit codes: 0 done, 1 rejected / NACKed / timed out, 2 invalid input,
3 held (it removes most of the mesh: ``--allow-removal``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from xdsd.admin.client import AdminClient, fail, operator_token
from xdsd.status import safe

EXIT_INVALID = 2
EXIT_HELD = 3


def _protect(args: argparse.Namespace) -> None:
    """The local check refuses a login's secret among this host's xdsd files, as the server will."""
    from xdsd.model.authentication import protect_secret_files

    protect_secret_files([args.state_dir])


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.admin_address, operator_token(args.token, args.state_dir))


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        print(f"xdsd: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def _validate(path: str, content: bytes) -> bool:
    from xdsd.errors import MeshError
    from xdsd.sources.file import parse_bytes

    try:
        parse_bytes(content, path)
    except MeshError as exc:
        for err in exc.errors:
            print(f"{path}: {safe(err)}", file=sys.stderr)
        print(f"{path}: invalid ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''})", file=sys.stderr)
        return False
    return True


def _print_diff(report: dict[str, Any]) -> bool:
    """Prints the per-group changes; True if there are any."""
    from xdsd.diff import render

    groups = report.get("groups") or {}
    if groups:
        print(safe(render(groups)))
    else:
        print("no change for any connected proxy")
    removes = report.get("removes") or {}
    if removes.get("services") or removes.get("gateways") or removes.get("endpoints"):
        print(f"removes: services {removes.get('services')}, gateways {removes.get('gateways')}, "
              f"{removes.get('endpoints')} endpoints" + (" (it would be held: --allow-removal)" if report.get("would_hold") else ""))
    return bool(groups) or not report.get("unchanged", False)


def diff(args: argparse.Namespace) -> int:
    _protect(args)
    content = _read(args.file)
    if content is None or not _validate(args.file, content):
        return EXIT_INVALID
    status, report = _client(args).request("POST", "/v1/config/diff", content)
    if status == 400 and isinstance(report, dict) and report.get("valid") is False:
        for err in report.get("errors", []):
            print(f"{args.file}: {safe(err)}", file=sys.stderr)
        return EXIT_INVALID
    if status != 200:
        return fail("diff", status, report) + 1  # 2: could not tell
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if report.get("groups") or not report.get("unchanged") else 0
    return 1 if _print_diff(report) else 0


def apply(args: argparse.Namespace) -> int:
    _protect(args)
    content = _read(args.file)
    if content is None or not _validate(args.file, content):
        return EXIT_INVALID
    client = _client(args)
    status, report = client.request("POST", "/v1/config/diff", content)
    params = []
    if status == 200:
        _print_diff(report)
        if isinstance(report.get("base"), int):
            # A shared store: the write is a compare-and-swap on the revision this diff was made
            # against; an apply that came first in between makes this one a conflict (409).
            params.append(f"base={report['base']}")
    if args.allow_removal:
        params.append("allow_removal=1")
    query = "?" + "&".join(params) if params else ""
    status, out = client.request("POST", f"/v1/config/apply{query}", content)
    return _outcome("apply", client, status, out, args)


def _outcome(command: str, client: AdminClient, status: int, out: Any, args: argparse.Namespace) -> int:
    if status != 200 or not isinstance(out, dict):
        return fail(command, status, out)
    result = out.get("result")
    if result == "held":
        held = out.get("held") or {}
        print(f"xdsd {command}: held: it removes {held.get('removes')}; it is applied if the file stays unchanged "
              f"for the settle period, or now with --allow-removal", file=sys.stderr)
        return EXIT_HELD
    if result == "unchanged":
        print(f"unchanged: revision {out.get('history_revision')} is served already")
        return 0
    if result == "rolling-out":
        rollout = out.get("rollout") or {}
        print(f"staged rollout: {len(rollout.get('canaries', []))} canary proxies first, the rest after "
              f"{rollout.get('wait_seconds')}s unless a canary NACKs")
        if args.no_wait:
            return 0
        rollout = wait_for_rollout(client, args.timeout + float(rollout.get("wait_seconds") or 0))
        if rollout.get("state") == "rolled_back":
            nack = rollout.get("nack") or {}
            print(f"xdsd {command}: rolled back: canary {safe(nack.get('node'))} NACKed {nack.get('type')}: "
                  f"{safe(nack.get('error'))}; the other proxies kept the previous revision", file=sys.stderr)
            return 1
        if rollout.get("state") != "promoted":
            print(f"xdsd {command}: the rollout did not finish in time (state {rollout.get('state')})", file=sys.stderr)
            return 1
        print("promoted: every proxy gets the new revision")
        return wait_for_proxies(client, args.timeout)
    print(f"{result}: config revision {out.get('history_revision')} ({out.get('summary', '')})")
    if args.no_wait:
        return 0
    return wait_for_proxies(client, args.timeout)


def wait_for_rollout(client: AdminClient, timeout: float) -> dict[str, Any]:
    """Until the staged rollout under way is promoted, rolled back or superseded."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = client.get("/debug/config")
        rollout = body.get("rollout") if status == 200 and isinstance(body, dict) else None
        if not isinstance(rollout, dict) or rollout.get("state") != "canary" or time.monotonic() > deadline:
            return rollout if isinstance(rollout, dict) else {}
        time.sleep(0.2)


def wait_for_proxies(client: AdminClient, timeout: float) -> int:
    """Until every connected proxy has ACKed or NACKed what it is owed; prints the outcome per group."""
    deadline = time.monotonic() + timeout
    proxies: list[dict[str, Any]] = []
    while True:
        status, body = client.get("/debug/proxies")
        if status != 200 or not isinstance(body, list):
            return fail("apply", status, body)
        proxies = body
        pending = [p for p in proxies if any(t["state"] in ("STALE", "NOT SENT") for t in p["types"].values())]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    groups: dict[str, dict[str, list[str]]] = {}
    for p in proxies:
        states = {t["state"] for t in p["types"].values()}
        outcome = "NACKED" if "NACKED" in states else ("ACKED" if states <= {"SYNCED"} else "PENDING")
        groups.setdefault(p["cluster"], {}).setdefault(outcome, []).append(p["node_id"])
    failed = False
    for cluster in sorted(groups):
        parts = [f"{len(nodes)} {outcome.lower()}" for outcome, nodes in sorted(groups[cluster].items())]
        print(f"  {safe(cluster)}: {', '.join(parts)}")
        for p in proxies:
            if p["cluster"] == cluster:
                for name, t in p["types"].items():
                    if t.get("last_nack"):
                        print(f"    {safe(p['node_id'])} {name} NACK: {safe(t['last_nack'])}")
        failed = failed or "NACKED" in groups[cluster] or "PENDING" in groups[cluster]
    if not proxies:
        print("  (no proxies connected)")
    return 1 if failed else 0


def history(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "show":
        if args.revision is None:
            print("xdsd history show: give a revision number", file=sys.stderr)
            return EXIT_INVALID
        status, body = client.get(f"/v1/config/history/{args.revision}")
        if status != 200:
            return fail("history", status, body)
        print(f"# revision {body['revision']}, {_when(body['at'])}, {body['how']}: {body['summary']}")
        sys.stdout.write(body["content"])
        return 0
    status, body = client.get("/v1/config/history")
    if status != 200:
        return fail("history", status, body)
    current = body.get("current")
    for e in reversed(body.get("revisions", [])):
        mark = "*" if e["revision"] == current else " "
        print(f"{mark} {e['revision']:>5}  {_when(e['at'])}  {e['digest'][:12]}  {e['how']:<16}  {e['summary']}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    client = _client(args)
    query = f"?to={args.to}" if args.to is not None else ""
    status, out = client.request("POST", f"/v1/config/rollback{query}")
    return _outcome("rollback", client, status, out, args)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
