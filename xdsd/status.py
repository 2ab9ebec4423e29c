"""Text rendering of per-proxy sync status for ``xdsd status``."""

from __future__ import annotations

from typing import Any

TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")


def safe(value: object) -> str:
    """Text from the network made safe for a terminal: control characters (escape sequences that
    erase rows or write the clipboard, bare carriage returns) are shown escaped, not interpreted."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    version = safe((t.get("acked_version") or t.get("sent_version") or "")[:8])
    return f"{t['state']} {version}".strip()


def render_table(proxies: list[dict[str, Any]]) -> str:
    header = ["NODE", "CLUSTER", "PROTOCOL", *TYPES]
    rows = [header]
    errors = []
    for p in proxies:
        types = p.get("types", {})
        rows.append([safe(p["node_id"]), safe(p["cluster"]), f"{p['protocol']}/{p['transport']}",
                     *(_cell(types.get(t)) for t in TYPES)])
        for t in TYPES:
            if types.get(t, {}).get("last_nack"):
                errors.append(f"{safe(p['node_id'])} {t} NACK: {safe(types[t]['last_nack'])}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if not proxies:
        lines.append("(no proxies connected)")
    return "\n".join(lines + errors)


def render_node(p: dict[str, Any]) -> str:
    lines = [
        f"node:      {safe(p['node_id'])}",
        f"cluster:   {safe(p['cluster'])}",
        f"protocol:  {p['protocol']} over {p['transport']} (peer {safe(p['peer'])})",
        f"config:    revision {p.get('config_revision')}",
    ]
    if p.get("config_error"):
        lines.append("config error (last edit refused): " + "; ".join(safe(e) for e in p["config_error"]))
    for name, t in p.get("types", {}).items():
        lines.append(f"{name}: {t['state']}")
        lines.append(f"    current {t['current_version']}  sent {t['sent_version']} (nonce {t['sent_nonce']})"
                     f"  acked {safe(t['acked_version'] or '-')} (nonce {safe(t['acked_nonce'] or '-')})")
        if t.get("last_nack"):
            lines.append(f"    NACK of {safe(t.get('nacked_version'))}: {safe(t['last_nack'])}")
    return "\n".join(lines)


def render_replicas(data: dict[str, Any]) -> str:
    """``/debug/replicas``: every replica sharing the store, and the proxies connected to each."""
    lines = [f"\nreplicas ({safe(data.get('store'))}):"]
    for r in data.get("replicas", []):
        proxies = r.get("proxies") or []
        mark = "*" if r.get("self") else " "
        shown = ", ".join(safe(p) for p in proxies[:20]) + (f", ... ({len(proxies)})" if len(proxies) > 20 else "")
        lines.append(f"{mark} {safe(r.get('id'))}  xds {safe(r.get('xds_address'))}  admin {safe(r.get('admin_address'))}  "
                     f"{len(proxies)} proxies{': ' + shown if proxies else ''}")
    sync = data.get("sync") or {}
    if sync.get("last_error"):
        lines.append(f"  etcd: {safe(sync['last_error'])} (serving the last state)")
    return "\n".join(lines)
