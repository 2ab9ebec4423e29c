"""The docker-compose test mesh, checked without a Docker engine: the compose file's structure and
mounts, the Dockerfile's inputs, the mesh config, and every Envoy config under `envoy --mode validate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

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
