"""Text rendering of per-proxy sync status for ``xdsd status``."""

from __future__ import annotations

from typing import Any

TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")


def _cell(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    version = (t.get("acked_version") or t.get("sent_version") or "")[:8]
    return f"{t['state']} {version}".strip()


def render_table(proxies: list[dict[str, Any]]) -> str:
    header = ["NODE", "CLUSTER", "PROTOCOL", *TYPES]
    rows = [header]
    errors = []
    for p in proxies:
        types = p.get("types", {})
        rows.append([p["node_id"], p["cluster"], f"{p['protocol']}/{p['transport']}", *(_cell(types.get(t)) for t in TYPES)])
        for t in TYPES:
            if types.get(t, {}).get("last_nack"):
                errors.append(f"{p['node_id']} {t} NACK: {types[t]['last_nack']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if not proxies:
        lines.append("(no proxies connected)")
    return "\n".join(lines + errors)


def render_node(p: dict[str, Any]) -> str:
    lines = [
        f"node:      {p['node_id']}",
        f"cluster:   {p['cluster']}",
        f"protocol:  {p['protocol']} over {p['transport']} (peer {p['peer']})",
        f"config:    revision {p.get('config_revision')}",
    ]
    if p.get("config_error"):
        lines.append("config error (last edit refused): " + "; ".join(p["config_error"]))
    for name, t in p.get("types", {}).items():
        lines.append(f"{name}: {t['state']}")
        lines.append(f"    current {t['current_version']}  sent {t['sent_version']} (nonce {t['sent_nonce']})"
                     f"  acked {t['acked_version'] or '-'} (nonce {t['acked_nonce'] or '-'})")
        if t.get("last_nack"):
            lines.append(f"    NACK of {t.get('nacked_version')}: {t['last_nack']}")
    return "\n".join(lines)
