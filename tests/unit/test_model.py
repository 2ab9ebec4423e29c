"""The mesh config: what is accepted, and how each mistake is reported (field path + reason)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdsd.cli import main
from xdsd.errors import MeshError
from xdsd.model import load_mesh, parse_mesh

VALID = """
services:
  reviews:
    endpoints:
      - {address: 127.0.0.2, port: 8080, weight: 3}
      - {address: 127.0.0.3, port: 8080, weight: 1}
  productpage:
    endpoints: [{address: productpage.internal, port: 9080}]
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {prefix: /reviews, service: reviews}
      - {prefix: /, service: productpage}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh(text)
    return [str(e) for e in info.value.errors]


def test_valid_mesh_and_defaults() -> None:
    mesh = load_mesh(VALID)
    ep = mesh.services["productpage"].endpoints[0]
    assert ep.weight == 1 and mesh.services["reviews"].protocol == "http1"
    assert mesh.services["reviews"].connect_timeout == 1.0
    assert mesh.mesh.trust_domain == "mesh.local"
    assert load_mesh("").services == {}


def test_port_zero_names_the_field() -> None:
    text = VALID.replace("127.0.0.3, port: 8080", "127.0.0.3, port: 0")
    assert errors(text) == ["services.reviews.endpoints[1].port: must be 1..65535, got 0"]


@pytest.mark.parametrize(
    "edit, path, reason",
    [
        (("port: 8080, weight: 3", "port: 70000, weight: 3"), "services.reviews.endpoints[0].port", "must be 1..65535"),
        (("port: 8080, weight: 3", "port: '80', weight: 3"), "services.reviews.endpoints[0].port", "integer"),
        (("port: 8080, weight: 3", "port: true, weight: 3"), "services.reviews.endpoints[0].port", "integer"),
        (("weight: 3", "weight: 0"), "services.reviews.endpoints[0].weight", "must be 1..1000000"),
        (("weight: 3", "weight: -2"), "services.reviews.endpoints[0].weight", "must be 1..1000000"),
        (("127.0.0.2", "'bad host!'"), "services.reviews.endpoints[0].address", "neither an IP address nor a host name"),
        (("127.0.0.2", "999.1.1.1"), "services.reviews.endpoints[0].address", "neither an IP address nor a host name"),
        (("weight: 3", "wieght: 3"), "services.reviews.endpoints[0].wieght", "unknown field"),
        (("service: productpage", "service: details"), "gateways.edge.routes[1].service", "unknown service 'details'"),
        (("prefix: /reviews", "prefix: reviews"), "gateways.edge.routes[0].prefix", "must start with '/'"),
        (("prefix: /reviews", "prefix: /"), "gateways.edge.routes[1].prefix", "duplicate prefix"),
        (("127.0.0.3, port: 8080", "127.0.0.2, port: 8080"), "services.reviews.endpoints[1]", "duplicate endpoint"),
        (("  reviews:\n", "  Reviews:\n"), "services.Reviews", "not a valid name"),
        (("listen: {address: 127.0.0.1", "listen: {address: localhost"), "gateways.edge.listen.address", "not an IP address"),
    ],
)
def test_each_mistake_names_its_field(edit: tuple[str, str], path: str, reason: str) -> None:
    found = errors(VALID.replace(*edit, 1))
    assert any(e.startswith(path + ":") and reason in e for e in found), found


@pytest.mark.parametrize("value", ["1", "-1s", "abc", "1d"])
def test_bad_durations(value: str) -> None:
    found = errors(VALID.replace("  reviews:\n", f"  reviews:\n    connect_timeout: {value!r}\n"))
    assert any(e.startswith("services.reviews.connect_timeout:") for e in found), found


def test_duplicate_yaml_keys_are_errors() -> None:
    text = VALID.replace("  productpage:\n", "  reviews:\n    endpoints: []\n  productpage:\n")
    found = errors(text)
    assert found == [found[0]] and found[0].startswith("services.reviews: duplicate key (line")


def test_gateway_named_like_a_service_and_shared_listen_address() -> None:
    text = VALID + "  reviews:\n    listen: {address: 127.0.0.1, port: 10000}\n"
    found = errors(text)
    assert any(e.startswith("gateways.reviews: name 'reviews' is also a service") for e in found)
    assert any(e.startswith("gateways.reviews.listen:") and "already the listen address" in e for e in found)


def test_not_yaml_and_not_a_mapping() -> None:
    assert errors("services: [unclosed")[0].startswith("not valid YAML")
    assert errors("- a\n- b\n") == ["the mesh config must be a mapping, got list"]


def test_sidecar_rules() -> None:
    text = """
services:
  productpage:
    sidecar: {inbound: {address: 127.0.0.2, port: 15006}, app_port: 9080, upstreams: {reviews: 9080, ghost: 9082}}
  reviews:
    endpoints: [{address: 127.0.0.3, port: 8080}]
    sidecar: {inbound: {port: 15006}, app_port: 9080}
"""
    found = errors(text)
    assert "services.productpage.sidecar.upstreams.ghost: unknown service 'ghost'" in found
    assert "services.productpage.sidecar.upstreams.reviews: port 9080 on 127.0.0.1 is already app_port" in found
    assert any(e.startswith("services.reviews.endpoints[0].port: a service with a sidecar is reached on its inbound port") for e in found)


ips = st.tuples(*[st.integers(1, 254)] * 4).map(lambda t: ".".join(map(str, t)))
endpoint = st.fixed_dictionaries({"address": ips, "port": st.integers(1, 65535), "weight": st.integers(1, 1000)})
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@given(st.dictionaries(names, st.lists(endpoint, max_size=4, unique_by=lambda e: (e["address"], e["port"])), max_size=5))
def test_generated_valid_meshes_parse_and_round_trip(services: dict[str, list[dict[str, object]]]) -> None:
    data = {"services": {n: {"endpoints": eps} for n, eps in services.items()}}
    mesh = parse_mesh(data)
    assert parse_mesh(mesh.model_dump()) == mesh


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_any_port_outside_the_range_is_rejected_with_its_path(port: int) -> None:
    with pytest.raises(MeshError) as info:
        parse_mesh({"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": port}]}}})
    assert [e.path for e in info.value.errors] == ["services.a.endpoints[0].port"]


def test_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(VALID.replace("127.0.0.3, port: 8080", "127.0.0.3, port: 0"))
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr()
    assert re.fullmatch(rf"{re.escape(str(good))}: valid: 2 services, 3 endpoints, 1 gateways, 2 routes\n", out.out)
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: services.reviews.endpoints[1].port: must be 1..65535, got 0" in err
    proc = subprocess.run([sys.executable, "-m", "xdsd", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "endpoints[1].port" in proc.stderr


def test_readme_config_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Mesh config reference", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    mesh = load_mesh(block)
    assert "ratings" in mesh.services and mesh.services["ratings"].sidecar is not None
