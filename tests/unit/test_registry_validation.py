"""Registration input is validated to the field before anything is stored: bodies that once got a
500 and poisoned the registry (lone surrogates, deep nesting, huge numbers, a trailing newline)
are refused naming the field, and nothing that cannot be served is ever stored or loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdsd.errors import FieldError
from xdsd.generators.endpoints import load_assignment
from xdsd.model import Mesh, load_mesh
from xdsd.registry.body import MAX_BODY, MAX_DEPTH, BodyTooLarge, nesting_depth, parse_body
from xdsd.registry.instance import (
    Instance,
    RegistrationError,
    RegistrationInput,
    check_ids,
    default_instance_id,
    instance_json,
    instance_pb,
    servable,
)
from xdsd.registry.merge import merge, mesh_check
from xdsd.registry.registry import Registry
from xdsd.registry.store import LocalStore, MemoryStore

MESH: Mesh = load_mesh(yaml.safe_dump({"services": {"web": {}, "static": {"endpoints": [{"address": "10.9.9.9", "port": 80}]}}}))
GOOD = {"service": "web", "instance_id": "w1", "address": "10.0.0.1", "port": 8080}


def registry(store: Any = None) -> Registry:
    reg = Registry(store if store is not None else MemoryStore(), clock=lambda: 1000.0)
    reg.mesh_check = mesh_check(lambda: MESH)
    return reg


def errors_of(raw: bytes | dict[str, Any]) -> list[FieldError]:
    """The field errors of a registration given as body bytes or as parsed data."""
    with pytest.raises(RegistrationError) as exc:
        RegistrationInput.parse(parse_body(raw) if isinstance(raw, bytes) else raw)
    return exc.value.errors


def paths(errors: list[FieldError]) -> list[str]:
    return [e.path for e in errors]


def body(text: str) -> bytes:
    """A body written as raw JSON text (so that it can hold escapes such as \\ud800)."""
    return text.encode()


def assert_servable(reg: Registry) -> None:
    """Everything stored encodes to JSON and to the protobufs it is served as."""
    for inst in reg.list():
        json.dumps(inst.as_json()).encode("utf-8")
        json.dumps(instance_json(inst), ensure_ascii=False).encode("utf-8")
        instance_pb(inst).SerializeToString()
    merged = merge(MESH, reg.list())
    for name in merged.services:
        load_assignment(name, merged.endpoints_of(name), "zone-a").SerializeToString()


# -- finding 1: lone surrogates --------------------------------------------------------------

SURROGATES = [
    ('{"service":"web","address":"10.0.0.1","port":80,"zone":"\\ud800"}', "zone"),
    ('{"service":"web","address":"10.0.0.1","port":80,"labels":{"v":"\\udc80"}}', "labels.v"),
    ('{"service":"web","address":"10.0.0.1","port":80,"labels":{"\\udc80":"v"}}', 'labels["\\udc80"]'),
    ('{"service":"web","address":"10.0.0.1","port":80,"instance_id":"i\\ud800"}', "instance_id"),
    ('{"service":"w\\ud800","address":"10.0.0.1","port":80}', "service"),
    ('{"service":"web","address":"10.0.0.\\udfff","port":80}', "address"),
    ('{"service":"web","address":"10.0.0.1","port":80,"\\ud800x":1}', '["\\ud800x"]'),
]


@pytest.mark.parametrize("text, field", SURROGATES, ids=[f for _, f in SURROGATES])
def test_a_lone_surrogate_anywhere_is_refused_naming_the_field_and_stores_nothing(text: str, field: str) -> None:
    errors = errors_of(body(text))
    assert field in paths(errors), errors
    assert all("surrogate" in e.message for e in errors), errors
    reg = registry()
    with pytest.raises(RegistrationError):
        reg.register(json.loads(text))  # in-process data too (json.loads keeps the surrogate)
    assert reg.list() == []


def test_error_messages_are_always_encodable() -> None:
    for text, _ in SURROGATES:
        for e in errors_of(body(text)):
            str(e).encode("utf-8")
    for e in errors_of({"service": "\ud800" * 100, "address": "\x00", "port": 1}):
        str(e).encode("utf-8")


# -- finding 1: nesting, size, numbers --------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_refused_without_recursion(depth: int) -> None:
    text = "[" * depth + "]" * depth
    assert nesting_depth(text) == depth  # no RecursionError at any depth
    with pytest.raises(RegistrationError) as exc:
        parse_body(text.encode())
    assert exc.value.errors[0].path == "body"
    nested = '{"service":"web","address":"10.0.0.1","port":80,"labels":' + '{"a":' * depth + "1" + "}" * depth + "}"
    with pytest.raises(RegistrationError) as exc:
        parse_body(nested.encode())
    assert exc.value.errors[0].path == "body"


def test_the_depth_bound_ignores_brackets_inside_strings() -> None:
    inner = '"[[[{{{\\"[[[" '
    assert nesting_depth('{"zone": ' + inner + ', "a": [[1]]}') == 3
    deep_ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_body(("{" + '"a":' + deep_ok[1:-1] + "}").encode()) is not None
    with pytest.raises(RegistrationError, match="deeper"):
        parse_body(("{" + '"a":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}").encode())


def test_a_body_over_the_size_limit_is_refused() -> None:
    with pytest.raises(BodyTooLarge):
        parse_body(b'{"zone":"' + b"a" * MAX_BODY + b'"}')


@pytest.mark.parametrize("raw", [b"\xff{}", b'{"zone":"\xed\xa0\x80"}', b"[]", b"null", b"{", b'{"ttl":NaN}',
                                 b'{"ttl":Infinity}', b'{"a":1}{"b":2}', b"\xef\xbb\xbf{}"])
def test_bodies_that_are_not_one_json_object_in_utf8_are_refused(raw: bytes) -> None:
    with pytest.raises(RegistrationError) as exc:
        parse_body(raw)
    assert paths(exc.value.errors) == ["body"]


@pytest.mark.parametrize("field", ["ttl", "port", "weight"])
@pytest.mark.parametrize("digits", [400, 5000])
def test_huge_integers_are_refused_naming_the_field(field: str, digits: int) -> None:
    text = json.dumps(GOOD)[:-1] + f', "{field}": {"9" * digits}}}'
    errors = errors_of(text.encode())
    assert paths(errors) == [field], errors
    assert f"{digits} digits" in errors[0].message and len(errors[0].message) < 200
    errors = errors_of({**GOOD, field: 10**digits})  # the same as a Python int, in-process
    assert paths(errors) == [field]


@pytest.mark.parametrize("change, field", [
    ({"port": True}, "port"), ({"weight": False}, "weight"), ({"ttl": True}, "ttl"), ({"port": 80.0}, "port"),
    ({"weight": "2"}, "weight"), ({"port": -1}, "port"), ({"ttl": 1e400}, "ttl"), ({"ttl": float("nan")}, "ttl"),
    ({"ttl": 86401}, "ttl"), ({"ttl": "9" * 100 + "s"}, "ttl"), ({"ttl": []}, "ttl"), ({"zone": 1}, "zone"),
    ({"labels": []}, "labels"), ({"labels": {"k": 1}}, "labels.k"), ({"instance_id": 7}, "instance_id"),
    ({"service": None}, "service"), ({"address": ["10.0.0.1"]}, "address"), ({"colour": "blue"}, "colour"),
])
def test_types_are_strict(change: dict[str, Any], field: str) -> None:
    assert field in paths(errors_of({**GOOD, **change}))


# -- finding 1: anchored patterns and the default id ---------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"address": "127.0.0.1\n"}, "address"), ({"service": "web\n"}, "service"), ({"instance_id": "w1\n"}, "instance_id"),
    ({"labels": {"k\n": "v"}}, 'labels["k\\n"]'), ({"zone": "a\nb"}, "zone"), ({"labels": {"k": "v\r\n"}}, "labels.k"),
    ({"zone": "z" * 129}, "zone"), ({"labels": {"k": "v" * 257}}, "labels.k"), ({"instance_id": "i" * 261}, "instance_id"),
    ({"address": "fe80::1%eth0"}, "address"), ({"zone": "\x85"}, "zone"),
])
def test_patterns_match_the_whole_value_and_lengths_are_bounded(change: dict[str, Any], field: str) -> None:
    assert field in paths(errors_of({**GOOD, **change}))


@pytest.mark.parametrize("address, expected_id", [
    ("::1", "[::1]:8080"), ("2001:db8::7", "[2001:db8::7]:8080"), ("0::0001", "[::1]:8080"),
    ("10.0.0.7", "10.0.0.7:8080"), ("vm7.internal", "vm7.internal:8080"),
])
def test_every_valid_address_registers_without_an_instance_id(address: str, expected_id: str) -> None:
    reg = registry()
    inst = reg.register({"service": "web", "address": address, "port": 8080})
    assert inst.instance_id == expected_id == default_instance_id(inst.address, 8080)
    assert reg.heartbeat("web", expected_id).instance_id == expected_id
    check_ids("web", expected_id)
    assert_servable(reg)


def test_a_host_name_of_the_longest_length_gets_a_valid_default_id() -> None:
    host = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    inst = registry().register({"service": "web", "address": host + ".", "port": 65535})
    assert inst.instance_id == f"{host}.:65535"


def test_printable_unicode_is_fine_in_zones_and_label_values() -> None:
    reg = registry()
    reg.register({**GOOD, "zone": "zürich-1", "labels": {"team": "données ☃", "empty": ""}})
    assert_servable(reg)


def test_a_refused_registration_changes_nothing() -> None:
    reg = registry()
    reg.register(GOOD)
    before = reg.instances()
    with pytest.raises(RegistrationError):
        reg.register({**GOOD, "zone": "\ud800"})
    assert reg.instances() == before


# -- nothing stored that cannot be served -----------------------------------------------------

def test_servable_refuses_what_the_rules_would_have_refused() -> None:
    good = Instance(service="web", instance_id="w1", address="10.0.0.1", port=80)
    assert servable(good) == []
    assert servable(Instance(service="web", instance_id="w1", address="10.0.0.1", port=80, zone="\ud800")) != []
    assert servable(Instance(service="web", instance_id="w1", address="10.0.0.1", port=80, labels={"k": "\udc80"})) != []
    assert servable(Instance(service="web", instance_id="w1", address="10.0.0.1", port=80, expires_at=1e30)) != []


def poisoned_file(tmp_path: Path) -> Path:
    """registrations.json as the registry before these rules could write it."""
    good = {"service": "web", "instance_id": "ok", "address": "10.0.0.1", "port": 80, "weight": 1, "zone": None,
            "labels": {}, "ttl": 60.0, "state": "ACTIVE", "expires_at": 5000.0}
    bad = [
        {**good, "instance_id": "z", "zone": "\ud800"},
        {**good, "instance_id": "l", "labels": {"v": "\udc80"}},
        {**good, "instance_id": "k", "labels": {"\udc80": "v"}},
        {**good, "instance_id": "n", "address": "127.0.0.1\n"},
        {**good, "instance_id": "p", "port": 10**400},
        {**good, "instance_id": "s", "state": "GONE"},
        {**good, "instance_id": "e", "expires_at": 1e300},
        {**good, "instance_id": "x", "extra": 1},
        "not an object",
    ]
    path = tmp_path / "registrations.json"
    path.write_text(json.dumps({"instances": [good, *bad]}))  # ensure_ascii: \ud800 escapes, as before
    return path


def test_loading_a_poisoned_file_drops_the_bad_entries_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    poisoned_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="xdsd.registry.store"):
        loaded = LocalStore(tmp_path).load()
    assert [i.instance_id for i in loaded] == ["ok"]
    assert sum("dropped entry" in r.getMessage() for r in caplog.records) == 9
    for r in caplog.records:
        r.getMessage().encode("utf-8")  # the warnings themselves are printable
    reg = registry(LocalStore(tmp_path))
    assert [i.instance_id for i in reg.list()] == ["ok"]
    reg.register(GOOD)
    reg.flush()
    assert {i.instance_id for i in LocalStore(tmp_path).load()} == {"ok", "w1"}
    assert_servable(reg)


@pytest.mark.parametrize("content", [b"not json", b"[1,2]", b'{"instances": 3}', b"\xff\xfe", b"[" * 100_000, b"{}"])
def test_an_unreadable_file_is_set_aside_and_the_registry_starts_empty(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "registrations.json").write_bytes(content)
    assert LocalStore(tmp_path).load() == []
    assert (tmp_path / "registrations.json.unreadable").read_bytes() == content
    reg = registry(LocalStore(tmp_path))
    reg.register(GOOD)
    assert [i.instance_id for i in LocalStore(tmp_path).load()] == ["w1"]


def test_the_store_round_trips_the_token_id_and_reads_files_without_one(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    inst = Instance(service="web", instance_id="w1", address="10.0.0.1", port=80, expires_at=2000.0, token_id="abc")
    store.save([inst])
    assert store.load() == [inst]
    data = inst.as_json()
    del data["token_id"]
    (tmp_path / "registrations.json").write_text(json.dumps({"instances": [data]}))
    assert store.load()[0].token_id == ""
