"""Mesh configs written by an attacker (or a careless script): every one is a MeshError that names
the field, never another exception, never a mesh that Envoy would refuse or xdsd could not serve."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_model import VALID, base
from xdsd.bootstrap import AUTHZ_CLUSTER, XDS_CLUSTER
from xdsd.errors import FieldError, MeshError
from xdsd.generators.telemetry import ADMIN_CLUSTER, COLLECTOR_CLUSTER
from xdsd.model import load_mesh, load_mesh_file, parse_mesh
from xdsd.model.fields import (
    MAX_STRING,
    check_host,
    check_ip,
    check_name,
    check_trust_domain,
    is_ip,
    parse_duration,
    reserved_name_problem,
)
from xdsd.model.load import MAX_DEPTH, MAX_NODES, MAX_TEXT_BYTES

MODEL = Path(__file__).resolve().parents[2] / "xdsd" / "model"


def errors_of(data: dict[str, Any]) -> list[FieldError]:
    with pytest.raises(MeshError) as info:
        parse_mesh(data)
    assert info.value.errors and all(isinstance(e, FieldError) for e in info.value.errors)
    return info.value.errors


def text_errors(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh(text)
    return [str(e) for e in info.value.errors]


def one(data: dict[str, Any]) -> FieldError:
    found = errors_of(data)
    assert len(found) == 1, found
    return found[0]


# --- a trailing newline is not part of a valid value ----------------------------------------------


@pytest.mark.parametrize("check, value", [
    (check_ip, "127.0.0.1\n"), (check_host, "127.0.0.1\n"), (check_host, "reviews.internal\n"),
    (check_host, "reviews\n"), (check_name, "reviews\n"), (check_trust_domain, "mesh.local\n"),
    (parse_duration, "1s\n"), (parse_duration, "250ms\n"), (parse_duration, "\t1s"),
])
def test_the_field_checks_match_the_whole_value(check: Any, value: str) -> None:
    with pytest.raises(ValueError):
        check(value)


def test_no_pattern_in_the_model_can_match_before_a_final_newline() -> None:
    """``$`` matches before a final newline and ``re.match`` checks a prefix only: the model's
    patterns are applied with ``fullmatch`` (a tokenizer may ``match`` at a position)."""
    for path in MODEL.glob("*.py"):
        source = path.read_text()
        assert not re.search(r"""re\.compile\(r?["'][^"']*\$["']""", source), path
        assert not re.search(r"_RE\.match\([^,()]*\)", source), path


@pytest.mark.parametrize("where, path", [
    (lambda d, v: d["services"]["reviews"]["endpoints"][0].update(address=v), "services.reviews.endpoints[0].address"),
    (lambda d, v: d["gateways"]["edge"]["listen"].update(address=v), "gateways.edge.listen.address"),
    (lambda d, v: d.update(mesh={"trust_domain": v}), "mesh.trust_domain"),
    (lambda d, v: d["services"]["reviews"].update(connect_timeout=v), "services.reviews.connect_timeout"),
    (lambda d, v: d["gateways"]["edge"]["routes"][0].update(prefix=v), "gateways.edge.routes[0].prefix"),
])
@pytest.mark.parametrize("value", ["127.0.0.1\n", "reviews.internal\n", "mesh.local\n", "1s\n", "/reviews\n"])
def test_a_trailing_newline_is_refused_with_its_path(where: Any, path: str, value: str) -> None:
    data = base()
    where(data, value)
    assert path in {e.path for e in errors_of(data)}


def test_a_trailing_newline_from_yaml_is_refused() -> None:
    text = VALID.replace("{address: 127.0.0.2,", '{address: "127.0.0.2\\n",')
    assert text_errors(text) == [
        "services.reviews.endpoints[0].address: control character U+000A is not allowed: '127.0.0.2\\n'"]
    text = VALID.replace("productpage.internal", '"productpage.internal\\n"')
    assert text_errors(text)[0].startswith("services.productpage.endpoints[0].address: control character U+000A")


def test_names_with_a_newline_are_refused() -> None:
    data = base()
    data["services"]["ratings\n"] = {}
    assert one(data).path == "services.'ratings\\n'"
    data = base()
    data["gateways"]["edge"]["routes"][0]["service"] = "reviews\n"
    assert one(data).path == "gateways.edge.routes[0].service"


@pytest.mark.parametrize("address", ["fe80::1%eth0", "::1%\n", "::1%lo x", "fe80::1%25eth0"])
def test_ipv6_zone_ids_are_refused(address: str) -> None:
    assert not is_ip(address)
    with pytest.raises(ValueError):
        check_ip(address)
    with pytest.raises(ValueError):
        check_host(address)


# --- nesting, size, and YAML that does not construct ------------------------------------------------


def _deep_block(levels: int) -> str:
    return "".join(" " * i + f"k{i}:\n" for i in range(levels)) + " " * levels + "x\n"


@pytest.mark.parametrize("text", [
    "services: " + "[" * 3000 + "]" * 3000 + "\n",
    "services: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    _deep_block(3000),
    "".join("  " * i + "-\n" for i in range(3000)),
    "[" * 100_000,
])
def test_deep_nesting_is_refused_before_it_can_recurse(text: str) -> None:
    limit = sys.getrecursionlimit()
    [err] = text_errors(text)
    assert err.endswith(f": nested deeper than {MAX_DEPTH} levels of lists and mappings"), err[-200:]
    assert sys.getrecursionlimit() == limit
    assert load_mesh(VALID).summary() == "2 services, 3 endpoints, 1 gateways, 2 routes"  # the interpreter is fine


def test_the_depth_error_names_the_path() -> None:
    [err] = text_errors(_deep_block(100))
    assert err.startswith("k0.k1.k2.") and ".k63: nested deeper" in err


def test_nesting_up_to_the_limit_is_only_a_type_error() -> None:
    text = "services: {a: {labels: " + "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3) + "}}\n"
    assert "nested deeper" not in "".join(text_errors(text))
    text = "services: {a: {labels: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}}\n"
    assert "nested deeper" in "".join(text_errors(text))


def test_aliases_cannot_nest_past_the_limit() -> None:
    lines = ["a0: &a0 " + "[" * 40 + "x" + "]" * 40]
    lines += [f"a{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40 for i in range(1, 80)]
    [err] = text_errors("\n".join(lines) + "\n")
    assert err.endswith("nested deeper than 64 levels of lists and mappings")


def test_deep_and_cyclic_data_is_refused() -> None:
    deep: Any = "x"
    for _ in range(3000):
        deep = {"a": deep}
    [err] = errors_of({"services": deep})
    assert err.message == "nested deeper than 64 levels of lists and mappings"
    cyclic: dict[str, Any] = {}
    cyclic["services"] = cyclic
    [err] = errors_of(cyclic)
    assert err.message.startswith("nested deeper")
    wide: list[Any] = ["x"]
    for _ in range(40):
        wide = [wide, wide]  # shared: 2^40 values when walked
    assert errors_of({"services": {"a": {"endpoints": wide}}})[0].message == f"more than {MAX_NODES} values"


def test_size_limits(tmp_path: Path) -> None:
    assert text_errors("#" * (MAX_TEXT_BYTES + 1)) == ["the mesh config is larger than 32 MiB"]
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_TEXT_BYTES + 1))
    with pytest.raises(MeshError) as info:
        load_mesh_file(big)
    assert str(info.value) == f"{big} is larger than 32 MiB"
    data = base()
    data["services"]["reviews"]["endpoints"][0]["zone"] = "z" * (MAX_STRING + 1)
    assert one(data) == FieldError("services.reviews.endpoints[0].zone", f"at most {MAX_STRING} characters, got {MAX_STRING + 1}")


def test_files_that_are_not_utf8_or_cannot_be_opened(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("services: {caf\xe9: {}}\n".encode("latin-1"))
    with pytest.raises(MeshError) as info:
        load_mesh_file(latin)
    assert str(info.value).startswith(f"{latin} is not UTF-8: ")
    for path in [tmp_path, tmp_path / "a\0b"]:
        with pytest.raises(MeshError) as info:
            load_mesh_file(path)
        assert str(info.value).startswith("cannot read ")


@pytest.mark.parametrize("value, message", [
    ("!!int abc", "not a valid int: 'abc'"),
    ("!!float abc", "not a valid float: 'abc'"),
    ("!!bool maybe", "not a valid bool: 'maybe'"),
    ("9" * 5000, "number out of range: integers in a mesh config fit in 64 bits"),
    ("0x" + "f" * 5000, "number out of range: integers in a mesh config fit in 64 bits"),
    ("18446744073709551616", "number out of range: integers in a mesh config fit in 64 bits"),
    ("!!binary AAAA", "unsupported YAML tag '!!binary': a mesh config holds only strings, numbers, booleans, null, "
                      "lists and mappings"),
    ("!!set {a, b}", "unsupported YAML tag '!!set': a mesh config holds only strings, numbers, booleans, null, "
                     "lists and mappings"),
    ("!!omap [a: 1]", "unsupported YAML tag '!!omap': a mesh config holds only strings, numbers, booleans, null, "
                      "lists and mappings"),
    ("!custom 80", "unsupported YAML tag '!custom': a mesh config holds only strings, numbers, booleans, null, "
                   "lists and mappings"),
])
def test_scalars_that_do_not_construct_name_the_field(value: str, message: str) -> None:
    text = VALID.replace("127.0.0.3, port: 8080", f"127.0.0.3, port: {value}")
    assert text_errors(text) == [f"services.reviews.endpoints[1].port: {message}"]


def test_dates_are_text_and_keys_are_names() -> None:
    # `2024-13-45` looks like a YAML timestamp (and would not construct as one); no mesh field is a date.
    text = VALID.replace("weight: 1}", "weight: 1, zone: 2024-13-45}")
    assert load_mesh(text).services["reviews"].endpoints[1].zone == "2024-13-45"
    assert text_errors("services:\n  ? [a, b]\n  : {}\n") == [
        "services.<complex key>: a mapping key must be a name, not a list or mapping"]


@pytest.mark.parametrize("key, message", [
    (10**5000, "key number out of range: integers in a mesh config fit in 64 bits"),
    ((1, 2), "a mapping key must be a name, got tuple"),
    (frozenset(), "a mapping key must be a name, got frozenset"),
], ids=["huge-int", "tuple", "frozenset"])
def test_keys_parse_mesh_cannot_take(key: object, message: str) -> None:
    assert one({"services": {key: {}}}) == FieldError("services.<key>", message)


@pytest.mark.parametrize("value, message", [
    (2**64, "number out of range: integers in a mesh config fit in 64 bits"),
    (b"10.0.0.1", "must be a string, number, boolean, null, list or mapping, got bytes"),
    ({"10.0.0.1"}, "must be a string, number, boolean, null, list or mapping, got set"),
    (object(), "must be a string, number, boolean, null, list or mapping, got object"),
])
def test_values_parse_mesh_cannot_take(value: object, message: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["zone"] = value
    assert one(data) == FieldError("services.reviews.endpoints[0].zone", message)


# --- strings that cannot be served ---------------------------------------------------------------


def _with_policy() -> dict[str, Any]:
    data = base()
    reviews = data["services"]["reviews"]
    reviews["endpoints"][0]["labels"] = {"version": "v1"}
    reviews["subsets"] = {"v1": {"version": "v1"}}
    reviews["load_balancer"] = {"policy": "ring_hash", "hash_on": {"cookie": "session"}}
    data["gateways"]["edge"]["routes"][0].update(headers={"x-canary": "yes"})
    data["gateways"]["edge"]["routes"].append({"regex": "/items/[0-9]+", "service": "reviews"})
    data["telemetry"] = {"tracing": {"collector": "127.0.0.1:4317", "service_name": "edge"},
                         "access_log": {"path": "/dev/stdout"}}
    parse_mesh(copy.deepcopy(data))
    return data


_FIELDS = {
    "services.reviews.endpoints[0].zone": lambda d, v: d["services"]["reviews"]["endpoints"][0].update(zone=v),
    "services.reviews.endpoints[0].labels.version": lambda d, v: d["services"]["reviews"]["endpoints"][0]["labels"].update(version=v),
    "services.reviews.subsets.v1.version": lambda d, v: d["services"]["reviews"]["subsets"]["v1"].update(version=v),
    "gateways.edge.routes[0].headers.x-canary": lambda d, v: d["gateways"]["edge"]["routes"][0]["headers"].update({"x-canary": v}),
    "gateways.edge.routes[0].prefix": lambda d, v: d["gateways"]["edge"]["routes"][0].update(prefix="/" + v),
    "gateways.edge.routes[2].regex": lambda d, v: d["gateways"]["edge"]["routes"][2].update(regex="/" + v),
    "telemetry.tracing.service_name": lambda d, v: d["telemetry"]["tracing"].update(service_name=v),
    "telemetry.access_log.path": lambda d, v: d["telemetry"]["access_log"].update(path="/" + v),
    "services.reviews.load_balancer.hash_on.cookie": lambda d, v: d["services"]["reviews"]["load_balancer"]["hash_on"].update(cookie=v),
}


@pytest.mark.parametrize("path", list(_FIELDS))
@pytest.mark.parametrize("bad, kind", [("\ud800", "lone surrogate U+D800"), ("a\udfffb", "lone surrogate U+DFFF"),
                                       ("a\x00b", "control character U+0000"), ("a\r\nb", "control character U+000D"),
                                       ("\x7f", "control character U+007F"), ("\x85", "control character U+0085")])
def test_strings_that_cannot_be_served_are_refused(path: str, bad: str, kind: str) -> None:
    data = _with_policy()
    _FIELDS[path](data, bad)
    err = one(data)
    assert err.path == path and err.message.startswith(f"{kind} is not allowed: "), err
    err.message.encode("utf-8")  # the message itself can be printed and logged


def test_a_lone_surrogate_from_yaml_escapes_is_refused() -> None:
    text = VALID.replace("weight: 1}", 'weight: 1, zone: "\\ud800", labels: {"v\\udc00": x}}')
    assert text_errors(text) == [
        "services.reviews.endpoints[1].zone: lone surrogate U+D800 is not allowed: '\\ud800'",
        "services.reviews.endpoints[1].labels.'v\\udc00': key lone surrogate U+DC00 is not allowed: 'v\\udc00'",
    ]
    for err in text_errors(text):
        err.encode("utf-8")


def test_header_values_and_zones_may_be_any_printable_text() -> None:
    data = _with_policy()
    data["gateways"]["edge"]["routes"][0]["headers"]["x-canary"] = "ja, bitte \u00e9\u4e2d"
    data["services"]["reviews"]["endpoints"][0]["zone"] = "eu-west \u00e9"
    parse_mesh(data)


@pytest.mark.parametrize("cookie", ["", "a b", "a;b", "é"])
def test_cookie_names_are_tokens(cookie: str) -> None:
    data = _with_policy()
    data["services"]["reviews"]["load_balancer"]["hash_on"]["cookie"] = cookie
    assert one(data).path == "services.reviews.load_balancer.hash_on.cookie"


@pytest.mark.parametrize("collector", ["jaeger:\u00b2", "jaeger:\u0664\u0663\u0661\u0667", "jaeger:" + "9" * 5000])
def test_collector_ports_are_ascii_digits(collector: str) -> None:
    data = {"telemetry": {"tracing": {"collector": collector}}}
    assert one(data).path == "telemetry.tracing.collector"


# --- names xdsd keeps for its own resources ----------------------------------------------------

INTERNAL = [XDS_CLUSTER, AUTHZ_CLUSTER, ADMIN_CLUSTER, COLLECTOR_CLUSTER, "xdsd_stats", "xds", "xdsd"]


def test_every_internal_name_is_reserved() -> None:
    for name in INTERNAL:
        assert reserved_name_problem(name) is not None, name
    assert reserved_name_problem("reviews") is None and reserved_name_problem("my-xds") is None


@pytest.mark.parametrize("name", INTERNAL)
def test_a_service_cannot_take_an_internal_name(name: str) -> None:
    data = base()
    data["services"][name] = {"endpoints": [{"address": "10.0.0.9", "port": 18000}]}
    data["gateways"]["edge"]["routes"].append({"prefix": "/xds", "service": name})
    assert one(data) == FieldError(
        f"services.{name}", f"{name!r} is reserved for xdsd's own resources: names starting with 'xds' "
                            "cannot name a service, gateway or subset")


@pytest.mark.parametrize("name", INTERNAL)
def test_a_gateway_cannot_take_an_internal_name(name: str) -> None:
    data = base()
    data["gateways"][name] = {"listen": {"address": "127.0.0.1", "port": 10001}}
    assert one(data).path == f"gateways.{name}"


@pytest.mark.parametrize("name", INTERNAL)
def test_a_subset_cannot_take_an_internal_name(name: str) -> None:
    data = base()
    data["services"]["reviews"]["endpoints"][0]["labels"] = {"v": "1"}
    data["services"]["reviews"]["subsets"] = {name: {"v": "1"}}
    assert one(data).path == f"services.reviews.subsets.{name}"


def test_the_telemetry_section_with_a_service_named_like_its_cluster() -> None:
    """The report: a service `xdsd-admin` next to telemetry stats gave Envoy two clusters of that name."""
    text = VALID.replace("  productpage:\n", "  xdsd-admin:\n    endpoints: [{address: 10.0.0.9, port: 80}]\n"
                                             "  productpage:\n") + "telemetry: {stats: {port: 15090}}\n"
    assert text_errors(text) == ["services.xdsd-admin: 'xdsd-admin' is reserved for xdsd's own resources: names "
                                 "starting with 'xds' cannot name a service, gateway or subset"]


def test_separators_of_internal_names_cannot_appear_in_names() -> None:
    """`inbound|<port>|<svc>`, `outbound|<port>|<svc>`, `stats|<port>` and `<svc>~<subset>` cannot
    collide with a name: `|` and `~` are not name characters."""
    for name in ["inbound|9080|reviews", "stats|15090", "outbound|reviews", "reviews~v1"]:
        with pytest.raises(ValueError):
            check_name(name)


# --- numbers and durations Envoy would refuse -------------------------------------------------


@pytest.mark.parametrize("lifetime, ok", [("1s", True), ("8760h", True), ("999ms", False), ("1ns", False)])
def test_cert_lifetime_bounds(lifetime: str, ok: bool) -> None:
    data = base()
    data["mesh"] = {"cert_lifetime": lifetime}
    if ok:
        parse_mesh(data)
    else:
        err = one(data)
        assert err.path == "mesh.cert_lifetime", err


def test_the_weights_of_one_zone_fit_in_32_bits() -> None:
    data = {"services": {"big": {"endpoints": [
        {"address": f"10.0.{i // 250}.{i % 250 + 1}", "port": 80, "weight": 1_000_000} for i in range(4295)]}}}
    assert one(data) == FieldError(
        "services.big.endpoints", "the weights in zone '' add up to 4295000000; Envoy allows at most 4294967295 per zone")
    for i, ep in enumerate(data["services"]["big"]["endpoints"]):
        ep["zone"] = f"z{i % 2}"
    parse_mesh(data)


@pytest.mark.parametrize("regex, message", [
    ("", "must not be empty"),
    ("/a\\Z", "\\Z is not supported (RE2 syntax; use $)"),
    ("/a++", "possessive repetition (*+, ++, ?+) is not supported (RE2 syntax)"),
    ("/(?>a)", "atomic groups are not supported (RE2 syntax)"),
    ("/(a)?(?(1)b|c)", "conditional groups are not supported (RE2 syntax)"),
    ("/(?P<x>a)(?P=x)", "lookaround and backreferences are not supported (RE2 syntax)"),
    ("(?x)/a", "only the flags i, m and s are supported (RE2 syntax)"),
    ("/(?a:b)", "only the flags i, m and s are supported (RE2 syntax)"),
    ("/\\u0041", "\\u escapes are not supported (RE2 syntax)"),
    ("/a{1001}", "a repetition count is at most 1000 (RE2)"),
    ("/" + "(" * 40 + ")" * 40, "groups nested more than 32 deep"),
    ("/" + "(?:" * 1000 + ")" * 1000, "groups nested more than 32 deep"),
    ("/a{99999999999}", "not a valid regular expression: the repetition number is too large"),
    ("/" + "a" * 100, "too complex for Envoy: its RE2 program would have about 105 instructions, at most 100 are "
                      "allowed (shorten the pattern, or match a prefix or exact path)"),
    # Envoy 1.40: "RE2 program size of 150 > max program size of 100".
    ("/(?P<id>[a-z0-9-]{1,36})$", "too complex for Envoy: its RE2 program would have about 151 instructions, at "
                                  "most 100 are allowed (shorten the pattern, or match a prefix or exact path)"),
    ("/a{1000}", "too complex for Envoy: its RE2 program would have about 1005 instructions, at most 100 are "
                 "allowed (shorten the pattern, or match a prefix or exact path)"),
])
def test_regexes_envoy_would_refuse(regex: str, message: str) -> None:
    data = base()
    data["gateways"]["edge"]["routes"][0] = {"regex": regex, "service": "reviews"}
    assert one(data) == FieldError("gateways.edge.routes[0].regex", message)


@pytest.mark.parametrize("regex", ["/items/[0-9]+", "/" + "a" * 95, "(?i)/api/v[12]/.*", "/(?s:a.b)", "/(?P<id>[a-z0-9-]{1,20})$",
                                   "/(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|CONNECT|TRACE)"])
def test_regexes_envoy_takes(regex: str) -> None:
    data = base()
    data["gateways"]["edge"]["routes"][0] = {"regex": regex, "service": "reviews"}
    parse_mesh(data)


def test_yaml_dump_of_an_accepted_mesh_reads_back() -> None:
    mesh = parse_mesh(_with_policy())
    assert load_mesh(yaml.safe_dump(mesh.model_dump(mode="json", by_alias=True, exclude_defaults=True))) == mesh


# --- access-log formats Envoy would refuse ---------------------------------------------------------


@pytest.mark.parametrize("operator, problem", [
    ("%BOGUS%", "unknown command operator %BOGUS%"),
    ("100%", "no command operator at position 3 (write %% for a percent sign)"),
    ("%REQ()%", "%REQ% needs parameters, such as %REQ(...)%"),
    ("%REQ%", "%REQ% needs parameters, such as %REQ(...)%"),
    ("%RESPONSE_CODE(x)%", "%RESPONSE_CODE% takes no parameters"),
    ("%RESPONSE_CODE:3%", "%RESPONSE_CODE% cannot be truncated (:N)"),
    ("%REQ(:PATH):x%", "no command operator at position 0 (write %% for a percent sign)"),
])
def test_access_log_operators_envoy_would_refuse(operator: str, problem: str) -> None:
    data = {"telemetry": {"access_log": {"fields": {"x": operator}}}}
    assert one(data) == FieldError("telemetry.access_log.fields", f"'x': {problem}, got {operator!r}")


@pytest.mark.parametrize("operator", ["%REQ(:PATH)%", "%START_TIME(%s)%", "%%%RESPONSE_CODE%%%", "%REQ(x-user?x-id):16%",
                                      "%DYNAMIC_METADATA(envoy.lb:canary)%", "code=%RESPONSE_CODE% flags=%RESPONSE_FLAGS%"])
def test_access_log_operators_envoy_takes(operator: str) -> None:
    parse_mesh({"telemetry": {"access_log": {"fields": {"x": operator}}}})
