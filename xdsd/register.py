"""``xdsd register``: the whole VM-side agent in one command. Registers the instance, heart-beats
until interrupted, and deregisters (DRAINING) on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

from xdsd.auth.tokens import TOKEN_HEADER
from xdsd.model.fields import parse_duration
from xdsd.registry.instance import default_instance_id


def _reply(status: int, raw: bytes) -> dict[str, Any]:
    """The JSON object of an answer; anything else (a proxy's error page) as an error."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"errors": [f"HTTP {status}"]}


def _post(base: str, path: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if token:
        headers[TOKEN_HEADER] = token
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, _reply(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _reply(exc.code, exc.read())


def _labels(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs; ValueError names one without ``=``."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise ValueError(f"--label {bad[0]!r}: use KEY=VALUE")
    return dict(kv.split("=", 1) for kv in pairs)


def run(args: argparse.Namespace, token: str | None) -> int:
    base = f"http://{args.admin_address[0]}:{args.admin_address[1]}"
    try:
        ttl = parse_duration(args.ttl)
        labels = _labels(args.label or [])
    except ValueError as exc:
        print(f"xdsd register: {exc}", file=sys.stderr)
        return 2
    # The server's default for a missing instance_id, sent explicitly: heartbeats need it.
    instance_id = args.instance_id or default_instance_id(args.address, args.port)
    body: dict[str, Any] = {
        "service": args.service, "instance_id": instance_id, "address": args.address, "port": args.port,
        "ttl": args.ttl, "weight": args.weight,
    }
    if args.zone:
        body["zone"] = args.zone
    if labels:
        body["labels"] = labels
    try:
        status, reply = _post(base, "/v1/register", body, token)
    except OSError as exc:
        print(f"xdsd register: cannot reach {base}: {exc}", file=sys.stderr)
        return 2
    if status != 200:
        for err in reply.get("errors", [f"HTTP {status}"]):
            print(f"xdsd register: {err}", file=sys.stderr)
        return 1
    print(f"registered {args.service}/{instance_id} at {args.address}:{args.port} (ttl {args.ttl})", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ids = {"service": args.service, "instance_id": instance_id}
    interval = max(0.2, ttl / 3)
    while not stop.wait(interval):
        try:
            status, reply = _post(base, "/v1/heartbeat", ids, token)
            if status == 404:  # xdsd lost us (e.g. our TTL lapsed while it was unreachable): register again
                status, reply = _post(base, "/v1/register", body, token)
            if status != 200:
                print(f"xdsd register: heartbeat: {reply.get('errors', status)}", file=sys.stderr, flush=True)
        except OSError as exc:
            print(f"xdsd register: heartbeat failed: {exc}", file=sys.stderr, flush=True)
    try:
        _post(base, "/v1/deregister", ids, token)
        print(f"deregistered {args.service}/{instance_id} (draining)", flush=True)
    except OSError as exc:
        print(f"xdsd register: deregister failed: {exc}", file=sys.stderr)
    return 0
