"""The processor API, the loader and the built-in processors (pure functions, no Envoy)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdsd.errors import MeshError
from xdsd.model import load_mesh
from xdsd.processing import Continue, Headers, Message, Mutate, ReplaceBody, Respond
from xdsd.processing.builtins import JsonRedact, JsonSchema, SetHeaders, parse_path, redact
from xdsd.processing.loader import ProcessorError, build, check_reference, resolve

USER = "tests.integration.extproc_processors"


def test_headers_are_case_insensitive_read_only_and_join_repeats() -> None:
    h = Headers([("X-A", "1"), ("x-a", "2"), (":path", "/p")])
    assert h["x-a"] == "1,2" and h["X-A"] == "1,2" and h.all("x-a") == ["1", "2"]
    assert "X-a" in h and "x-b" not in h and len(h) == 2
    assert Message("request_headers", request=h).path == "/p"
    assert Message("response_headers", headers=Headers({":status": "404"})).status == 404
    assert Message("request_headers").status is None


def test_processors_are_found_by_builtin_name_entry_point_or_module_reference() -> None:
    assert isinstance(build("set-headers", {"request": {"set": {"x": "y"}}}), SetHeaders)
    fn = build(f"{USER}:shout", {})
    assert fn(Message("request_headers", headers=Headers({"x-word": "a"}))) == Mutate(
        set={"x-shouted": "A", "x-greeting": ""})
    with pytest.raises(ProcessorError, match="unknown processor 'nope'") as exc:
        resolve("nope")
    assert exc.value.field == "processor"
    with pytest.raises(ProcessorError, match="cannot import 'no_such_module_here'"):
        resolve("no_such_module_here:f")
    with pytest.raises(ProcessorError, match="has no attribute 'missing'"):
        resolve(f"{USER}:missing")
    with pytest.raises(ProcessorError, match="not a callable"):
        resolve(f"{USER}:USER_CONSTANT")
    with pytest.raises(ProcessorError, match="not a subclass of xdsd.processing.Processor"):
        build(f"{USER}:NotAProcessor", {})
    with pytest.raises(ProcessorError) as exc:
        build("json-redact", {"drop": "x"})
    assert exc.value.field == "args"
    for bad in ("Upper", "a b", "mod:", ":f", "a:b:c"):
        with pytest.raises(ValueError):
            check_reference(bad)


def _mesh(processing: str, service_processing: str = "") -> str:
    return f"""
services:
  web:
    endpoints: [{{address: 127.0.0.2, port: 15006}}]
    sidecar: {{inbound: {{address: 127.0.0.2, port: 15006}}, app_port: 9080}}
{service_processing}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes:
      - prefix: /
        service: web
        processing: {processing}
"""


@pytest.mark.parametrize(("processing", "error"), [
    ("{processor: nope}", "gateways.edge.routes[0].processing.processor: unknown processor 'nope'"),
    ("{processor: 'no_such_mod:f'}", "gateways.edge.routes[0].processing.processor: cannot import 'no_such_mod'"),
    ("{processor: json-redact, phases: [response_headers, response_body], args: {drop: [a..b]}}",
     "gateways.edge.routes[0].processing.args: drop: empty segment in path 'a..b'"),
    ("{processor: json-redact, phases: [response_headers, response_body], body: streamed, args: {drop: [a]}}",
     "gateways.edge.routes[0].processing.body: processor 'json-redact' reads whole bodies"),
    ("{processor: set-headers, phases: [request_body], body: none}",
     "gateways.edge.routes[0].processing.body: phase request_body needs body: buffered or streamed"),
    ("{processor: set-headers, body: buffered}",
     "gateways.edge.routes[0].processing.body: body: buffered needs request_body or response_body"),
    ("{processor: set-headers, phases: [trailers]}", "gateways.edge.routes[0].processing.phases[0]"),
    ("{processor: set-headers, failure: maybe}", "gateways.edge.routes[0].processing.failure"),
    ("{processor: set-headers, timeout: 2m}", "gateways.edge.routes[0].processing.timeout: must be at most 60s"),
    ("{processor: set-headers, args: {request: {set: {x-a: '{nope}'}}}}",
     "gateways.edge.routes[0].processing.args: request: set: x-a: unknown variable {nope}"),
    ("{processor: json-schema, phases: [request_body], args: {schema: {type: 5}}}",
     "gateways.edge.routes[0].processing.args: schema: not a valid JSON Schema"),
    ("{processor: json-redact, phases: [response_body], args: {drop: [a]}}",
     "gateways.edge.routes[0].processing.phases: processor 'json-redact' reads the headers of the bodies it is "
     "given: list response_headers with response_body"),
    # patterns RE2 cannot match in linear time are refused with the schema, where they are
    ("{processor: json-schema, phases: [request_body], args: {schema: {properties: {a: {pattern: '(x)\\1'}}}}}",
     "gateways.edge.routes[0].processing.args: schema: properties.a.pattern: '(x)\\\\1' is not supported by "
     "xdsd's linear-time regex engine (RE2)"),
    ("{processor: json-schema, phases: [request_body], args: {schema: {patternProperties: {'^(?=a)': {}}}}}",
     "gateways.edge.routes[0].processing.args: schema: patternProperties['^(?=a)']: '^(?=a)' is not supported"),
])
def test_bad_processing_is_a_field_path_error(processing: str, error: str) -> None:
    with pytest.raises(MeshError) as exc:
        load_mesh(_mesh(processing))
    assert error in str(exc.value), str(exc.value)


def test_a_valid_processing_step_on_a_route_and_on_a_service() -> None:
    mesh = load_mesh(_mesh("{processor: set-headers}",
                           "    processing: {processor: json-redact, phases: [response_headers, response_body], "
                           "args: {mask: [a]}}"))
    route = mesh.gateways["edge"].routes[0].processing
    assert route is not None and route.phases == ["request_headers"] and route.body_mode == "none"
    assert route.failure == "closed" and route.timeout == 0.2
    service = mesh.services["web"].processing
    assert service is not None and service.body_mode == "buffered"
    assert route.key("a") != route.key("b") and route.key("a") == route.key("a")


def test_set_headers_templates_from_the_caller_and_the_request() -> None:
    p = SetHeaders({"request": {"set": {"x-who": "{caller} {method} {path} {header.x-in} {claim.sub} {{x}}"},
                                "append": {"x-more": "1"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-status": "{status}"}}})
    req = Headers({":method": "GET", ":path": "/a", "x-in": "v\r\nx-evil: 1"})
    out = p(Message("request_headers", headers=req, request=req, caller="spiffe://td/service/a", claims={"sub": "u1"}))
    assert out == Mutate(set={"x-who": "spiffe://td/service/a GET /a vx-evil: 1 u1 {x}"}, append={"x-more": "1"},
                         remove=["x-drop"])
    resp = p(Message("response_headers", headers=Headers({":status": "201"}), request=req))
    assert resp == Mutate(set={"x-status": "201"}, append={}, remove=[])
    assert p(Message("request_body", body=b"x")) == Continue()
    for bad in ({"request": {"set": {"Host": "x"}}}, {"request": {"set": {"x": "{"}}}, {"other": {}},
                {"request": {"remove": "x"}}, {"request": {"set": {"x": 5}}}):
        with pytest.raises(ValueError):
            SetHeaders(bad)


def test_json_redact_drops_and_masks_by_path() -> None:
    p = JsonRedact({"drop": ["user.ssn", "items.*.card"], "mask": ["user.name", "tags.0"]})
    body = {"user": {"ssn": "1", "name": "n", "id": 7}, "items": [{"card": 1, "id": 1}, {"id": 2}], "tags": ["a", "b"]}
    out = p(Message("response_body", body=json.dumps(body).encode(),
                    headers=Headers({"content-type": "application/json; charset=utf-8"})))
    assert isinstance(out, ReplaceBody)
    assert json.loads(out.body) == {"user": {"name": "***", "id": 7}, "items": [{"id": 1}, {"id": 2}], "tags": ["***", "b"]}
    assert p(Message("response_body", body=b"<html>", headers=Headers({"content-type": "text/html"}))) == Continue()
    assert p(Message("response_body", body=b"not json")) == Continue()
    assert p(Message("response_body", body=b'{"other": 1}')) == Continue()  # nothing to redact: untouched
    with pytest.raises(ValueError):
        JsonRedact({})
    with pytest.raises(ValueError):
        parse_path("")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from("abc*0"), inner, max_size=4),
                     max_leaves=20)


def _values_at(document: Any, path: tuple[str | int, ...]) -> list[Any]:
    if not path:
        return [document]
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        keys = list(document) if head == "*" else [str(head)] if str(head) in document else []
        return [v for k in keys for v in _values_at(document[k], rest)]
    if isinstance(document, list):
        idx = range(len(document)) if head == "*" else [head] if isinstance(head, int) and head < len(document) else []
        return [v for i in idx for v in _values_at(document[i], rest)]
    return []


@settings(max_examples=200, deadline=None)
@given(_JSON, st.lists(st.sampled_from(["a", "b", "*", "0", "1"]), min_size=1, max_size=3))
def test_after_masking_every_value_at_the_path_is_the_mask(document: Any, parts: list[str]) -> None:
    path = parse_path(".".join(parts))
    masked = copy.deepcopy(document)
    n = redact(masked, path, "#")
    assert n == len(_values_at(document, path))
    assert all(v == "#" for v in _values_at(masked, path))
    dropped = copy.deepcopy(document)
    redact(dropped, path, None)
    json.dumps(dropped)  # still a JSON document
    if "*" not in parts and all(not p.isdigit() for p in parts):
        assert _values_at(dropped, path) == []


def test_json_schema_rejects_bad_request_bodies_with_400_and_the_message() -> None:
    p = JsonSchema({"schema": {"type": "object", "required": ["name"]}})
    post = Headers({":method": "POST"})
    bad = p(Message("request_body", body=b"{}", request=post))
    assert isinstance(bad, Respond) and bad.status == 400
    assert json.loads(bad.body) == {"error": "'name' is a required property", "path": "$"}
    not_json = p(Message("request_body", body=b"{", request=post))
    assert isinstance(not_json, Respond) and "not JSON" in json.loads(not_json.body)["error"]
    assert p(Message("request_body", body=b'{"name": 1}', request=post)) == Continue()
    assert p(Message("request_body", body=b"{", request=Headers({":method": "GET"}))) == Continue()
    with pytest.raises(ValueError, match="required"):
        JsonSchema({})


def test_json_schema_patterns_match_in_linear_time_with_ecma_escapes() -> None:
    """``^([a-z]+)+$`` backtracks exponentially in Python's re (seconds for 30 characters, holding
    the GIL); RE2 answers at once. ``\\u`` escapes (ECMA-262) still work."""
    p = JsonSchema({"schema": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^([a-z]+)+$"}, "e": {"pattern": "^\\u00e9$"}},
        "patternProperties": {"^x-([a-z]+)+$": {"type": "integer"}}, "additionalProperties": False}})
    post = Headers({":method": "POST"})
    evil = "a" * 40 + "!"
    bad = p(Message("request_body", body=json.dumps({"name": evil}).encode(), request=post))
    assert isinstance(bad, Respond) and bad.status == 400 and "does not match" in json.loads(bad.body)["error"]
    extra = p(Message("request_body", body=json.dumps({evil: 1}).encode(), request=post))
    assert isinstance(extra, Respond) and extra.status == 400
    typed = p(Message("request_body", body=json.dumps({"x-" + "a" * 40: "s"}).encode(), request=post))
    assert isinstance(typed, Respond) and json.loads(typed.body)["path"] == "$['x-" + "a" * 40 + "']"
    good = json.dumps({"name": "abc", "e": "é", "x-ab": 1}).encode()
    assert p(Message("request_body", body=good, request=post)) == Continue()


def test_json_schema_refuses_patterns_re2_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"schema: items.pattern: '\(a\)\\\\1' is not supported"):
        JsonSchema({"schema": {"items": {"pattern": "(a)\\1"}}})
    with pytest.raises(ValueError, match="unevaluatedProperties together with patternProperties"):
        JsonSchema({"schema": {"patternProperties": {"^a": {}}, "unevaluatedProperties": False}})
    JsonSchema({"schema": {"const": {"pattern": "(a)\\1"}}})  # data, not a pattern


def test_a_body_nested_too_deeply_is_a_400_not_an_error() -> None:
    p = JsonSchema({"schema": {"type": "object"}})
    post = Headers({":method": "POST"})
    for depth in (100_000, 700):  # past the JSON parser's limit; within it but past the validator's
        out = p(Message("request_body", body=b"[" * depth + b"]" * depth, request=post))
        assert isinstance(out, Respond) and out.status == 400, depth
    deep = JsonSchema({"schema": {"$ref": "#/$defs/n", "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}})
    out = deep(Message("request_body", body=b"[" * 900 + b"]" * 900, request=post))
    assert isinstance(out, Respond) and out.status == 400


def test_json_redact_fails_closed_on_bodies_it_cannot_read() -> None:
    p = JsonRedact({"drop": ["password_hash"]})
    import gzip

    secret = json.dumps({"user": "a", "password_hash": "x"}).encode()
    gzipped = p(Message("response_body", body=gzip.compress(secret),
                        headers=Headers({"content-type": "application/json", "content-encoding": "gzip"})))
    assert isinstance(gzipped, Respond) and gzipped.status == 502
    untyped = p(Message("response_body", body=gzip.compress(secret), headers=Headers({"content-encoding": "br"})))
    assert isinstance(untyped, Respond) and untyped.status == 502
    broken = p(Message("response_body", body=secret[:-1], headers=Headers({"content-type": "application/json"})))
    assert isinstance(broken, Respond) and broken.status == 502
    deep = p(Message("response_body", body=b"[" * 100_000 + b"]" * 100_000))
    assert isinstance(deep, Respond) and deep.status == 502
    request = p(Message("request_body", body=b"{", headers=Headers({"content-type": "application/json"})))
    assert isinstance(request, Respond) and request.status == 400
    identity = p(Message("response_body", body=secret,
                         headers=Headers({"content-type": "application/json", "content-encoding": "identity"})))
    assert isinstance(identity, ReplaceBody) and json.loads(identity.body) == {"user": "a"}
    html = p(Message("response_body", body=b"\x1f\x8b", headers=Headers({"content-type": "text/html",
                                                                          "content-encoding": "gzip"})))
    assert html == Continue()  # not JSON by its content type: nothing to redact
