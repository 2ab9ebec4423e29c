"""The mesh config: what is accepted, and how each mistake is reported (field path + reason)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsd.errors import FieldError, MeshError
from xdsd.model import Mesh, load_mesh, load_mesh_file, parse_mesh
from xdsd.model.fields import format_duration, parse_duration

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


def base() -> dict[str, Any]:
    """VALID as data, fresh for each test to edit."""
    return {
        "services": {
            "reviews": {
                "endpoints": [
                    {"address": "127.0.0.2", "port": 8080, "weight": 3},
                    {"address": "127.0.0.3", "port": 8080, "weight": 1},
                ]
            },
            "productpage": {"endpoints": [{"address": "productpage.internal", "port": 9080}]},
        },
        "gateways": {
            "edge": {
                "listen": {"address": "127.0.0.1", "port": 10000},
                "routes": [{"prefix": "/reviews", "service": "reviews"}, {"prefix": "/", "service": "productpage"}],
            }
        },
    }


def errors(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh(text)
    return [str(e) for e in info.value.errors]


def data_errors(data: dict[str, Any]) -> list[FieldError]:
    with pytest.raises(MeshError) as info:
        parse_mesh(data)
    assert info.value.errors, "a MeshError always says what is wrong"
    assert all(isinstance(e, FieldError) for e in info.value.errors)
    return info.value.errors


def only_error(data: dict[str, Any]) -> FieldError:
    found = data_errors(data)
    assert len(found) == 1, found
    return found[0]


# --- what is accepted --------------------------------------------------------------------------------


def test_valid_mesh_parses() -> None:
    mesh = load_mesh(VALID)
    assert isinstance(mesh, Mesh)
    assert list(mesh.services) == ["reviews", "productpage"]
    reviews = mesh.services["reviews"].endpoints
    assert [(e.address, e.port, e.weight) for e in reviews] == [("127.0.0.2", 8080, 3), ("127.0.0.3", 8080, 1)]
    edge = mesh.gateways["edge"]
    assert (edge.listen.address, edge.listen.port) == ("127.0.0.1", 10000)
    assert [(r.prefix, r.service) for r in edge.routes] == [("/reviews", "reviews"), ("/", "productpage")]
    assert mesh.summary() == "2 services, 3 endpoints, 1 gateways, 2 routes"
    assert parse_mesh(base()) == mesh


def test_defaults() -> None:
    mesh = load_mesh(VALID)
    page = mesh.services["productpage"]
    assert page.endpoints[0].weight == 1
    assert page.endpoints[0].status == "healthy" and page.endpoints[0].labels == {}
    assert page.protocol == "http1"
    assert page.connect_timeout == 1.0
    assert page.retries is None and page.timeout is None and page.sidecar is None
    assert mesh.mesh.trust_domain == "mesh.local" and mesh.mesh.cert_lifetime == 3600.0
    assert mesh.authorization == {}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n", "~\n", "{}\n"])
def test_an_empty_file_is_a_valid_empty_mesh(text: str) -> None:
    mesh = load_mesh(text)
    assert mesh == Mesh() and mesh.services == {} and mesh.gateways == {}
    assert mesh.summary() == "0 services, 0 endpoints, 0 gateways, 0 routes"


def test_the_model_is_frozen() -> None:
    mesh = load_mesh(VALID)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for a frozen instance
        mesh.services["reviews"].endpoints[0].port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "::1", "fd00::2", "reviews", "reviews.svc.internal", "reviews.internal.", "a-b.c1", "r2d2"],
)
def test_endpoint_addresses_accepted(address: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["address"] = address
    assert parse_mesh(data).services["reviews"].endpoints[0].address == address


@pytest.mark.parametrize("port", [1, 80, 65535])
def test_port_bounds_accepted(port: int) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][1]["port"] = port
    assert parse_mesh(data).services["reviews"].endpoints[1].port == port


@pytest.mark.parametrize(
    "text, seconds",
    [("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (" 3s ", 3.0), ("0.001ms", 0.000001)],
)
def test_durations_accepted(text: str, seconds: float) -> None:
    data = base()
    data["services"]["reviews"]["connect_timeout"] = text
    mesh = parse_mesh(data)
    assert mesh.services["reviews"].connect_timeout == seconds
    assert parse_mesh(mesh.model_dump()) == mesh


def test_protocol_and_other_service_options() -> None:
    data = base()
    data["services"]["reviews"].update(protocol="http2", timeout="5s", connect_timeout="250ms")
    data["services"]["reviews"]["endpoints"][0].update(zone="z1", labels={"version": "v2"}, status="draining")
    mesh = parse_mesh(data)
    svc = mesh.services["reviews"]
    assert (svc.protocol, svc.timeout, svc.connect_timeout) == ("http2", 5.0, 0.25)
    assert svc.endpoints[0].labels == {"version": "v2"} and svc.endpoints[0].status == "draining"


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = """
services:
  reviews:
    endpoints:
      - &ep {address: 10.0.0.1, port: 8080, weight: 2}
      - {<<: *ep, address: 10.0.0.2}
"""
    eps = load_mesh(text).services["reviews"].endpoints
    assert [(e.address, e.port, e.weight) for e in eps] == [("10.0.0.1", 8080, 2), ("10.0.0.2", 8080, 2)]


def test_mapping_keys_are_read_as_names_not_yaml_scalars() -> None:
    # Unquoted `123:` is an int and `on:` a bool to YAML 1.1; in a mesh file every key is a name.
    mesh = load_mesh("services:\n  123:\n    endpoints: []\n  on:\n    endpoints: []\n")
    assert list(mesh.services) == ["123", "on"]


def test_load_mesh_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(VALID)
    assert load_mesh_file(path) == load_mesh(VALID)
    assert load_mesh_file(str(path)) == load_mesh(VALID)


def test_load_mesh_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(MeshError) as info:
        load_mesh_file(tmp_path / "missing.yaml")
    [err] = info.value.errors
    assert err.path == "" and err.message.startswith("cannot read ") and "missing.yaml" in err.message


# --- each mistake names its field --------------------------------------------------------------------


@pytest.mark.parametrize(
    "port, message",
    [
        (0, "must be 1..65535, got 0"),
        (70000, "must be 1..65535, got 70000"),
        (-1, "must be 1..65535, got -1"),
        ("80", "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
        (80.0, "Input should be a valid integer"),
        (None, "Input should be a valid integer"),
    ],
)
def test_bad_port(port: object, message: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][1]["port"] = port
    assert only_error(data) == FieldError("services.reviews.endpoints[1].port", message)


def test_bad_port_from_yaml() -> None:
    for value, message in [
        ("0", "must be 1..65535, got 0"),
        ("70000", "must be 1..65535, got 70000"),
        ("'80'", "Input should be a valid integer"),
        ("true", "Input should be a valid integer"),
    ]:
        text = VALID.replace("127.0.0.3, port: 8080", f"127.0.0.3, port: {value}")
        assert errors(text) == [f"services.reviews.endpoints[1].port: {message}"]


def test_missing_port_and_address() -> None:
    data = base()
    del data["services"]["reviews"]["endpoints"][1]["port"]
    del data["services"]["reviews"]["endpoints"][0]["address"]
    found = {(e.path, e.message) for e in data_errors(data)}
    assert found == {
        ("services.reviews.endpoints[0].address", "Field required"),
        ("services.reviews.endpoints[1].port", "Field required"),
    }


@pytest.mark.parametrize("weight", [0, -1, -2, 1_000_001])
def test_bad_weight(weight: int) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["weight"] = weight
    assert only_error(data) == FieldError("services.reviews.endpoints[0].weight", f"must be 1..1000000, got {weight}")


def test_weight_must_be_an_integer() -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["weight"] = "3"
    err = only_error(data)
    assert err.path == "services.reviews.endpoints[0].weight" and "integer" in err.message


@pytest.mark.parametrize(
    "address",
    ["bad host!", "999.1.1.1", "1.2.3", "10.0.0.256", "010.0.0.1", "-lead.example", "trail-.example", "a..b", "", "a_b"],
)
def test_bad_address(address: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][1]["address"] = address
    err = only_error(data)
    assert err == FieldError(
        "services.reviews.endpoints[1].address", f"{address!r} is neither an IP address nor a host name"
    )


def test_address_must_be_a_string() -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][1]["address"] = 167772161
    err = only_error(data)
    assert err.path == "services.reviews.endpoints[1].address" and "string" in err.message


def test_unknown_field() -> None:
    text = VALID.replace("127.0.0.3, port: 8080, weight: 1", "127.0.0.3, port: 8080, wieght: 1")
    assert errors(text) == ["services.reviews.endpoints[1].wieght: unknown field"]


@pytest.mark.parametrize(
    "where, path",
    [
        (lambda d: d, "service"),
        (lambda d: d["services"]["reviews"], "services.reviews.endpoint"),
        (lambda d: d["gateways"]["edge"], "gateways.edge.route"),
        (lambda d: d["gateways"]["edge"]["listen"], "gateways.edge.listen.host"),
        (lambda d: d["gateways"]["edge"]["routes"][0], "gateways.edge.routes[0].cluster"),
    ],
)
def test_unknown_field_anywhere(where: Any, path: str) -> None:
    data = base()
    where(data)[path.rsplit(".", 1)[-1]] = 1
    assert only_error(data) == FieldError(path, "unknown field")


def test_route_to_unknown_service() -> None:
    data = base()
    del data["services"]["productpage"]
    assert only_error(data) == FieldError("gateways.edge.routes[1].service", "unknown service 'productpage'")
    text = VALID.replace("  productpage:\n    endpoints: [{address: productpage.internal, port: 9080}]\n", "")
    assert errors(text) == ["gateways.edge.routes[1].service: unknown service 'productpage'"]


def test_duplicate_yaml_keys() -> None:
    text = VALID.replace("  productpage:\n", "  reviews:\n    endpoints: []\n  productpage:\n")
    assert errors(text) == ["services.reviews: duplicate key (line 7)"]


def test_duplicate_yaml_keys_deeper_and_inside_lists() -> None:
    text = VALID.replace("port: 10000}", "port: 10000, port: 10001}").replace(
        "{prefix: /, service: productpage}", "{prefix: /, service: productpage, service: reviews}"
    )
    found = errors(text)
    assert found == [
        "gateways.edge.listen.port: duplicate key (line 11)",
        "gateways.edge.routes[1].service: duplicate key (line 14)",
    ]


def test_duplicate_endpoint() -> None:
    data = base()
    data["services"]["reviews"]["endpoints"].append({"address": "127.0.0.2", "port": 8080, "weight": 5})
    assert only_error(data) == FieldError(
        "services.reviews.endpoints[2]", "duplicate endpoint 127.0.0.2:8080 (same as endpoints[0])"
    )


@pytest.mark.parametrize("a, b", [("::1", "0:0::1"), ("fd00::1", "FD00:0::1"), ("Host.example", "host.example.")])
def test_duplicate_endpoint_spelled_differently(a: str, b: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"] = [{"address": a, "port": 80}, {"address": b, "port": 80}]
    err = only_error(data)
    assert err.path == "services.reviews.endpoints[1]" and "duplicate endpoint" in err.message


def test_same_address_on_another_port_or_service_is_fine() -> None:
    data = base()
    data["services"]["reviews"]["endpoints"].append({"address": "127.0.0.2", "port": 8081})
    data["services"]["productpage"]["endpoints"].append({"address": "127.0.0.2", "port": 8080})
    parse_mesh(data)


def test_duplicate_gateway_listen_address() -> None:
    data = base()
    data["services"]["web"] = {"endpoints": [{"address": "10.0.0.9", "port": 80}]}
    data["gateways"]["internal"] = {"listen": {"address": "127.0.0.1", "port": 10000}, "routes": []}
    assert only_error(data) == FieldError(
        "gateways.internal.listen", "127.0.0.1:10000 is already the listen address of gateway 'edge'"
    )
    data["gateways"]["internal"]["listen"]["port"] = 10001
    parse_mesh(data)


def test_gateway_named_like_a_service() -> None:
    data = base()
    data["gateways"]["reviews"] = {"listen": {"address": "127.0.0.1", "port": 10001}}
    assert only_error(data) == FieldError(
        "gateways.reviews", "name 'reviews' is also a service; node.cluster could not tell the two apart"
    )


def test_gateway_listen_must_be_an_ip() -> None:
    data = base()
    data["gateways"]["edge"]["listen"]["address"] = "localhost"
    assert only_error(data) == FieldError("gateways.edge.listen.address", "'localhost' is not an IP address")


def test_gateway_listen_is_required() -> None:
    data = base()
    del data["gateways"]["edge"]["listen"]
    assert only_error(data) == FieldError("gateways.edge.listen", "Field required")


@pytest.mark.parametrize("prefix", ["reviews", "", "*", "http://x/"])
def test_prefix_must_start_with_a_slash(prefix: str) -> None:
    data = base()
    data["gateways"]["edge"]["routes"][0]["prefix"] = prefix
    assert only_error(data) == FieldError("gateways.edge.routes[0].prefix", f"must start with '/', got {prefix!r}")


def test_duplicate_prefixes() -> None:
    data = base()
    data["gateways"]["edge"]["routes"][1]["prefix"] = "/reviews"
    assert only_error(data) == FieldError(
        "gateways.edge.routes[1].prefix", "duplicate prefix '/reviews' (same as routes[0]); it could never match"
    )


def test_several_mistakes_are_all_reported() -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["port"] = 0
    data["services"]["reviews"]["endpoints"][1]["weight"] = 0
    data["gateways"]["edge"]["routes"][0]["prefix"] = "x"
    assert {e.path for e in data_errors(data)} == {
        "services.reviews.endpoints[0].port",
        "services.reviews.endpoints[1].weight",
        "gateways.edge.routes[0].prefix",
    }


def test_invalid_yaml() -> None:
    for text in ["services: [unclosed", "services:\n\t- a\n", "a: 1\n---\nb: 2\n"]:
        [err] = errors(text)
        assert err.startswith("not valid YAML: "), err


def test_only_plain_yaml_tags() -> None:
    [err] = errors("x: !!python/object:os.system {}\n")
    assert err == ("x: unsupported YAML tag '!!python/object:os.system': a mesh config holds only strings, "
                   "numbers, booleans, null, lists and mappings")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int"), ("true\n", "bool")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert errors(text) == [f"the mesh config must be a mapping, got {kind}"]
    with pytest.raises(MeshError):
        parse_mesh([])  # type: ignore[arg-type]


def test_sections_must_be_mappings() -> None:
    assert errors("services: []\n") == ["services: Input should be a valid dictionary"]
    assert errors("services:\n  reviews:\n    endpoints: {}\n") == [
        "services.reviews.endpoints: Input should be a valid list"
    ]


def test_recursive_alias_is_an_error_not_a_crash() -> None:
    assert errors("services: &s\n  reviews: *s\n") == ["services.reviews: recursive alias: the value contains itself"]
    assert errors("services:\n  reviews:\n    endpoints: &e [*e]\n") == [
        "services.reviews.endpoints[0]: recursive alias: the value contains itself"
    ]


def test_alias_bomb_is_rejected() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    [err] = errors("\n".join(lines) + "\n")
    assert err.startswith("aliases expand to more than")


@pytest.mark.parametrize("value", ["'1'", "1", "'-1s'", "abc", "'1d'", "'1 s'", "'s'", "''", "true", "'0s'", "'0ms'"])
def test_bad_durations(value: str) -> None:
    found = errors(VALID.replace("  reviews:\n", f"  reviews:\n    connect_timeout: {value}\n"))
    assert len(found) == 1 and found[0].startswith("services.reviews.connect_timeout: "), found


def test_bad_duration_messages() -> None:
    for value, message in [
        ("1", "must be a duration string such as '250ms' or '2s', got 1"),
        ("'1'", "must be a duration such as '250ms', '2s', '1m' or '1h', got '1'"),
        ("'-1s'", "must be a duration such as '250ms', '2s', '1m' or '1h', got '-1s'"),
        ("abc", "must be a duration such as '250ms', '2s', '1m' or '1h', got 'abc'"),
        ("0s", "must be greater than zero"),
        ("0.0000000001s", "must be greater than zero"),  # below a nanosecond: Envoy would see 0
    ]:
        text = VALID.replace("  reviews:\n", f"  reviews:\n    connect_timeout: {value}\n")
        assert errors(text) == [f"services.reviews.connect_timeout: {message}"], value


def test_huge_durations_are_rejected() -> None:
    # At most a year: Envoy refuses durations from 2^63 ns (~292 years) on, and adds timeouts to its clock.
    for value in ["31536000.001s", "315576000001s", "1" * 400 + "s", "99999999999h", "8761h"]:
        data = base()
        data["gateways"]["edge"]["routes"][0]["timeout"] = value
        err = only_error(data)
        shown = repr(value) if len(value) <= 80 else f"{value[:80]!r}... ({len(value)} characters)"
        assert err == FieldError("gateways.edge.routes[0].timeout", f"must be at most 8760h (365 days), got {shown}"), err
    data = base()
    data["services"]["reviews"]["timeout"] = "8760h"
    assert parse_mesh(data).services["reviews"].timeout == 31536000.0


@pytest.mark.parametrize("name", ["Reviews", "REVIEWS", "reViews"])
def test_service_names_with_upper_case_are_rejected(name: str) -> None:
    data = base()
    data["services"][name] = data["services"].pop("reviews")
    data["gateways"]["edge"]["routes"][0]["service"] = name
    found = data_errors(data)
    assert FieldError(
        f"services.{name}",
        f"{name!r} is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
        "starting and ending with a letter or digit",
    ) in found
    assert any(e.path == "gateways.edge.routes[0].service" for e in found)


@pytest.mark.parametrize("name", ["-web", "web-", "a b", "x" * 64, "", "wéb"])
def test_other_bad_names(name: str) -> None:
    data = base()
    data["services"][name] = {}
    assert only_error(data).path == f"services.{name}"


def test_non_string_keys_in_data_name_the_key() -> None:
    # parse_mesh on data from elsewhere (JSON, code): the path must not look like a list index.
    found = data_errors({"services": {123: {"endpoints": [{"address": "10.0.0.1", "port": 0}]}}})
    assert {e.path for e in found} == {"services.123", "services.123.endpoints[0].port"}


def test_gateway_name_rules() -> None:
    data = base()
    data["gateways"]["Edge"] = data["gateways"].pop("edge")
    assert only_error(data).path == "gateways.Edge"


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
    assert any(
        e.startswith("services.reviews.endpoints[0].port: a service with a sidecar is reached on its inbound port")
        for e in found
    )


def test_readme_config_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Mesh config reference", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    mesh = load_mesh(block)
    assert "ratings" in mesh.services and mesh.services["ratings"].sidecar is not None


# --- properties ----------------------------------------------------------------------------------------

_label = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
names = st.from_regex(r"[a-z][a-z0-9._-]{0,10}[a-z0-9]", fullmatch=True).filter(lambda n: not n.startswith("xds"))
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(_label, min_size=1, max_size=3).map(".".join),
)
endpoints = st.fixed_dictionaries(
    {"address": addresses, "port": st.integers(1, 65535)},
    optional={
        "weight": st.integers(1, 1_000_000),
        "zone": st.none() | _label,
        "labels": st.dictionaries(_label, _label, max_size=2),
        "status": st.sampled_from(["healthy", "draining"]),
    },
)
nanoseconds = st.integers(1, 10**15)
durations = st.one_of(
    nanoseconds.map(lambda ns: f"{ns / 1e9:.9f}".rstrip("0").rstrip(".") + "s"),
    st.integers(1, 10**6).map(lambda n: f"{n}ms"),
    st.integers(1, 10**4).map(lambda n: f"{n}m"),
)
services = st.fixed_dictionaries(
    {"endpoints": st.lists(endpoints, max_size=4, unique_by=lambda e: (e["address"].lower(), e["port"]))},
    optional={
        "protocol": st.sampled_from(["http1", "http2"]),
        "connect_timeout": durations,
        "timeout": durations,
    },
)


@st.composite
def meshes(draw: st.DrawFn) -> dict[str, Any]:
    svcs = draw(st.dictionaries(names, services, max_size=5))
    gateways: dict[str, Any] = {}
    if svcs:
        gw_names = draw(st.lists(names.filter(lambda n: n not in svcs), max_size=3, unique=True))
        ports = draw(st.lists(st.integers(1, 65535), min_size=len(gw_names), max_size=len(gw_names), unique=True))
        for gw, port in zip(gw_names, ports, strict=True):
            prefixes = draw(st.lists(st.from_regex(r"/[a-z0-9/_-]{0,12}", fullmatch=True), max_size=4, unique=True))
            gateways[gw] = {
                "listen": {"address": draw(st.ip_addresses(v=4).map(str)), "port": port},
                "routes": [{"prefix": p, "service": draw(st.sampled_from(sorted(svcs)))} for p in prefixes],
            }
    return {"services": svcs, "gateways": gateways}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meshes())
def test_generated_valid_meshes_parse_and_round_trip(data: dict[str, Any]) -> None:
    original = copy.deepcopy(data)
    mesh = parse_mesh(data)
    assert data == original, "parsing does not change its input"
    assert set(mesh.services) == set(data["services"]) and set(mesh.gateways) == set(data["gateways"])
    for name, svc in data["services"].items():
        got = mesh.services[name].endpoints
        assert [(e.address, e.port, e.weight) for e in got] == [
            (e["address"], e["port"], e.get("weight", 1)) for e in svc["endpoints"]
        ]
    dumped = mesh.model_dump()
    assert parse_mesh(dumped) == mesh
    assert parse_mesh(mesh.model_dump(mode="json", by_alias=True)) == mesh
    assert parse_mesh(mesh.model_dump(exclude_defaults=True)) == mesh


@settings(max_examples=150, deadline=None)
@given(
    port=st.one_of(st.integers(min_value=-(2**63), max_value=0), st.integers(min_value=65536, max_value=2**64 - 1)),
    index=st.integers(0, 2),
    where=st.sampled_from(["endpoint", "listen"]),
)
def test_any_port_outside_the_range_is_rejected_with_its_path(port: int, index: int, where: str) -> None:
    data: dict[str, Any] = {"services": {"a": {"endpoints": [{"address": f"10.0.0.{i + 1}", "port": 80} for i in range(3)]}}}
    if where == "endpoint":
        data["services"]["a"]["endpoints"][index]["port"] = port
        path = f"services.a.endpoints[{index}].port"
    else:
        data["gateways"] = {"edge": {"listen": {"address": "0.0.0.0", "port": port}}}
        path = "gateways.edge.listen.port"
    assert only_error(data) == FieldError(path, f"must be 1..65535, got {port}")


@settings(max_examples=200, deadline=None)
@given(nanoseconds)
def test_durations_round_trip_through_their_text(ns: int) -> None:
    seconds = parse_duration(format_duration(ns / 1e9))
    assert round(seconds * 1e9) == ns
    assert parse_duration(format_duration(seconds)) == seconds
