"""``xdsd token``: mint node and operator tokens, list them, revoke them, rotate the signing key."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xdsd.auth import ledger
from xdsd.auth.tokens import NODE, OPERATOR, Claims, Keyring, TokenSigner, format_time


def mint(state_dir: Path, node_id: str, cluster: str, *, kind: str = NODE, ttl: float) -> tuple[str, Claims]:
    """A token signed with the state directory's current key, recorded in its issued list."""
    token, claims = TokenSigner.load_or_create(state_dir).mint(node_id, cluster, kind=kind, ttl=ttl)
    try:
        ledger.record_issued(state_dir, claims)
    except OSError as exc:  # a read-only copy of the key (a container): the token is good, the list misses it
        print(f"xdsd: token {claims.token_id} not recorded in {state_dir} ({exc.strerror or exc})", file=sys.stderr)
    return token, claims


def describe(claims: Claims) -> str:
    who = "operator" if claims.kind == OPERATOR else f"node {claims.node_id!r} of {claims.cluster!r}"
    return f"token {claims.token_id} for {who}, expires {format_time(claims.expires_at)}"


def run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    action = args.action or "issue"
    if action == "issue":
        if args.operator:
            if args.node_id or args.cluster:
                print("xdsd token: --operator takes no --node-id / --cluster", file=sys.stderr)
                return 2
            token, claims = mint(state_dir, "", "", kind=OPERATOR, ttl=args.ttl)
        else:
            if not (args.node_id and args.cluster):
                print("xdsd token: give --node-id and --cluster (a node token), or --operator", file=sys.stderr)
                return 2
            token, claims = mint(state_dir, args.node_id, args.cluster, ttl=args.ttl)
        print(token)
        print(f"xdsd token: {describe(claims)}", file=sys.stderr)
        return 0
    if action == "list":
        return _list(state_dir, args.all)
    if action == "revoke":
        if not (args.id or args.node_id):
            print("xdsd token revoke: give --id ID or --node-id ID", file=sys.stderr)
            return 2
        ledger.revoke(state_dir, token_id=args.id, node_id=args.node_id)
        what = [f"token {args.id}"] if args.id else []
        what += [f"every token of node {args.node_id!r} issued until now"] if args.node_id else []
        print(f"revoked {' and '.join(what)} (a running xdsd ends their streams within a second)")
        return 0
    if action == "rotate-key":
        old, new = Keyring.rotate(state_dir)
        print(f"new signing key {new}; tokens of key {old} stay valid until `xdsd token retire-key`")
        return 0
    if action == "retire-key":
        retired = Keyring.retire(state_dir, args.kid)
        if not retired:
            print("xdsd token retire-key: no previous key to retire", file=sys.stderr)
            return 1
        print(f"retired key(s) {', '.join(retired)}: their tokens are refused from now on")
        return 0
    raise AssertionError(action)


def _list(state_dir: Path, include_all: bool) -> int:
    now = time.time()
    revocations = ledger.Revocations.load(state_dir)
    keys = Keyring.load_or_create(state_dir).keys
    rows = [("ID", "KIND", "NODE", "CLUSTER", "EXPIRES", "STATE")]
    for item in ledger.issued(state_dir):
        try:
            token_id, kind = str(item["id"]), str(item["kind"])
            node_id, cluster = str(item.get("node_id") or ""), str(item.get("cluster") or "")
            issued_at, expires_at = float(item["issued_at"]), float(item["expires_at"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            continue
        why = revocations.revoked(token_id, node_id, issued_at)
        if why is not None:
            state = "revoked"
        elif expires_at <= now:
            state = "expired"
        elif item.get("key_id") not in keys:
            state = "key retired"
        else:
            state = "valid"
        if state != "valid" and not include_all:
            continue
        rows.append((token_id, kind, node_id or "-", cluster or "-", format_time(expires_at), state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return 0
