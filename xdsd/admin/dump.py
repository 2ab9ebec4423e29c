"""What xdsd serves one node, as JSON (``/debug/config_dump?node=ID``, ``xdsd config-dump``).
Private keys are never included (``xdsd.redact``)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from xdsd import typeurls
from xdsd.redact import redacted_any
from xdsd.server.xds import XdsServer


def _as_json(type_url: str, body: bytes) -> dict[str, Any]:
    return json_format.MessageToDict(redacted_any(type_url, body), preserving_proto_field_name=True)


def node_config(server: XdsServer, node_id: str) -> dict[str, Any] | None:
    streams = sorted((s for s in server.nodes.get(node_id, ()) if s.snapshot is not None), key=lambda s: s.id)
    if not streams:
        return None
    snap = streams[0].snapshot
    assert snap is not None
    resources: dict[str, list[dict[str, Any]]] = {}
    for type_url in typeurls.PUSH_ORDER:
        ts = snap.get(type_url)
        if ts.resources:
            resources[typeurls.short(type_url)] = [
                {"name": name, "version": r.version, "resource": _as_json(type_url, r.body)}
                for name, r in sorted(ts.resources.items())
            ]
    return {
        "node_id": node_id,
        "cluster": streams[0].cluster,
        "revision": snap.revision,
        "versions": {typeurls.short(t): ts.version for t, ts in snap.types.items() if ts.resources},
        "resources": resources,
    }
