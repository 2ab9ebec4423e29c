"""The docker-compose test mesh, checked without a Docker engine: the compose file's structure and
mounts, the Dockerfile's inputs, the mesh config, and every Envoy config under `envoy --mode validate`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.dashboard import DASHBOARD, dashboard_metric_names
from tests.support.envoy import envoy_binary
from xdsd.auth.tokens import TokenSigner
from xdsd.model import load_mesh_file

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAPS = sorted(p for p in (ROOT / "envoy").glob("*.yaml") if p.name != "mesh.yaml")


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_mesh_topology_and_pinned_images() -> None:
    services = compose()["services"]
    assert {"xdsd", "edge", "productpage", "reviews-v1", "reviews-v2", "ratings"} <= set(services)
    for app in ("productpage", "reviews-v1", "reviews-v2", "ratings"):
        sidecar = services[f"{app}-sidecar"]
        assert sidecar["network_mode"] == f"service:{app}"  # shares the app's localhost
        assert sidecar["image"] == "envoyproxy/envoy:v1.40.0"
        assert "--service" in services[app]["command"][0] and "xdsd register" in services[app]["command"][0]
    assert services["edge"]["image"].startswith("envoyproxy/envoy:v1.40")
    assert services["xdsd"]["build"] == "."


def test_compose_mounts_files_that_exist() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("./"):
                assert (ROOT / host).is_file(), f"{name} mounts missing {host}"


def test_dockerfile_copies_files_that_exist() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_compose_mesh_config_is_valid() -> None:
    mesh = load_mesh_file(ROOT / "envoy" / "mesh.yaml")
    assert set(mesh.services) == {"productpage", "reviews", "ratings"}
    assert all(s.sidecar is not None for s in mesh.services.values())


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=[p.stem for p in BOOTSTRAPS])
def test_envoy_config_validates(path: Path, tmp_path: Path) -> None:
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "--base-id-path", str(tmp_path / "base-id")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    boot = yaml.safe_load(path.read_text())
    token = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0]["value"]
    claims = TokenSigner.load_or_create(ROOT / "envoy" / "demo-state").verify(token)
    assert (claims.node_id, claims.cluster) == (boot["node"]["id"], boot["node"]["cluster"])


# -- telemetry: Prometheus, Grafana, Jaeger ---------------------------------------------------------


def xdsd_exported_names() -> set[str]:
    """The sample names xdsd's /metrics can carry (counters as ``_total``, histograms as
    ``_bucket``/``_sum``/``_count``), from its own registry."""
    from xdsd.observability.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_compose_runs_prometheus_grafana_and_jaeger() -> None:
    services = compose()["services"]
    assert {"prometheus", "grafana", "jaeger"} <= set(services)
    assert services["xdsd"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "jaeger:4317"
    mesh = load_mesh_file(ROOT / "envoy" / "mesh.yaml")
    tracing = mesh.telemetry.tracing
    assert tracing is not None and (tracing.collector_host, tracing.collector_port) == ("jaeger", 4317)
    assert mesh.telemetry.stats is not None and mesh.telemetry.access_log is not None


def test_prometheus_scrapes_xdsd_and_every_envoys_stats_listener() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    admin_port = int((ROOT / "Dockerfile").read_text().split('"--admin-address", "0.0.0.0:', 1)[1].split('"', 1)[0])
    assert [t for sc in jobs["xdsd"]["static_configs"] for t in sc["targets"]] == [f"xdsd:{admin_port}"]
    envoy = jobs["envoy"]
    assert envoy["metrics_path"] == "/stats/prometheus"
    stats = load_mesh_file(ROOT / "envoy" / "mesh.yaml").telemetry.stats
    assert stats is not None
    targets = {t for sc in envoy["static_configs"] for t in sc["targets"]}
    services = compose()["services"]
    # One target per Envoy: the gateway, and each sidecar by the name of the app whose network it shares.
    envoys = {name for name, s in services.items() if str(s.get("image", "")).startswith("envoyproxy/envoy")}
    expected = {(services[e]["network_mode"].split(":", 1)[1] if "network_mode" in services[e] else e) for e in envoys}
    assert targets == {f"{host}:{stats.port}" for host in expected}
    mesh_services = {sc["labels"]["mesh_service"] for sc in envoy["static_configs"]}
    assert mesh_services == {"edge", "productpage", "reviews", "ratings"}


def test_grafana_is_provisioned_with_the_dashboard_and_datasources() -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml").read_text())
    uids = {d["uid"]: d for d in ds["datasources"]}
    assert uids["prometheus"]["url"] == "http://prometheus:9090" and uids["jaeger"]["url"] == "http://jaeger:16686"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["grafana"]["volumes"]}
    assert (ROOT / mounts[f"{path}/xdsd-mesh.json"]).resolve() == DASHBOARD.resolve()
    dash = json.loads(DASHBOARD.read_text())
    used = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert used <= set(uids)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("proxies", "push latency", "nack", "authz", "request rate", "error rate", "latency p99 by service"):
        assert topic in titles, topic


def test_dashboard_queries_use_metrics_xdsd_exports() -> None:
    used = {m for m in dashboard_metric_names() if m.startswith("xdsd_")}
    assert used and used <= xdsd_exported_names(), sorted(used - xdsd_exported_names())
    # Envoy's names are checked against a real Envoy's /stats/prometheus in test_telemetry.py.
