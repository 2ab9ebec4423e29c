"""The Grafana dashboard of the compose mesh (deploy/grafana): which metrics its queries use."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "xdsd-mesh.json"
_METRIC_RE = re.compile(r"\b((?:xdsd|envoy)_[a-z0-9_]+)\b")
# Label names the pattern also matches.
_LABELS = {"envoy_http_conn_manager_prefix", "envoy_response_code_class", "envoy_cluster_name"}


def dashboard_metric_names() -> set[str]:
    """Every metric name a query of the provisioned dashboard uses."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in _METRIC_RE.findall(e)} - _LABELS
