"""``MeshReader`` reads successive texts of a mesh, parsing again only the services whose lines
changed. Property: for any sequence of texts, each read gives exactly what ``load_mesh`` gives for
that text -- the same Mesh, or a MeshError with the same errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.unit.test_mesh_fuzz import BASE, _yaml_bits, mutated
from xdsd.errors import MeshError
from xdsd.model import Mesh, load_mesh
from xdsd.model.incremental import MeshReader


def outcome(read: Any, text: str) -> tuple[str, Any]:
    try:
        return "mesh", read(text)
    except MeshError as exc:
        return "errors", [str(e) for e in exc.errors]


def agree(reader: MeshReader, text: str) -> tuple[str, Any]:
    got, want = outcome(reader.read, text), outcome(load_mesh, text)
    assert got == want, f"{text!r}:\nMeshReader: {got}\nload_mesh:  {want}"
    return got


def entries(data: dict[str, Any]) -> int:
    """Entries of the sections the reader cuts (services, gateways, authorization)."""
    return sum(len(data.get(section) or {}) for section in ("services", "gateways", "authorization"))


def fleet(services: int) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for i in range(services):
        data["services"][f"svc-{i}"] = {
            "endpoints": [{"address": f"10.1.{i}.{j}", "port": 8080} for j in range(3)],
            "retries": {"attempts": 2},
        }
    return data


# Lines that make YAML's structure unusual where the reader cuts the text.
_TRICKY_LINES = [
    "  x: &a {endpoints: [{address: 10.0.0.7, port: 1}]}", "  y: *a", "  z:", "  <<: *a", "- a", "  - a",
    "services:", "services: {}", "---", "...", '  w: "quoted', "    and: more\"", "  'q': 1", "  ? k",
    "#c", "  # c", "", "   ", "gateways: {}", "  v: |", "  v2: >-", "x: 'a", "  b'", "\tt: 1",
    "  u: [1,", "2]", "  dup: {}", "  dup: {}", "    endpoints: []", "  productpage: {}",
]


@st.composite
def rendered(draw: st.DrawFn, data: dict[str, Any]) -> str:
    """``data`` as YAML in one of the styles people and tools write, with comments here and there."""
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=draw(st.booleans()),
                              default_flow_style=draw(st.sampled_from([False, None])),
                              indent=draw(st.sampled_from([2, 4])), width=draw(st.sampled_from([30, 80, 4096])))
    except (yaml.YAMLError, ValueError):
        assume(False)
        raise
    lines = text.split("\n")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, draw(st.sampled_from(["# a comment", "", "    # indented comment", "  # c"])))
    return "\n".join(lines)


@st.composite
def damaged(draw: st.DrawFn, text: str) -> str:
    """``text`` after a few line edits: deleted, doubled, indented differently, replaced."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "double", "indent", "dedent", "replace", "insert", "bits"]))
        if action == "delete":
            del lines[at]
        elif action == "double":
            lines.insert(at, lines[at])
        elif action == "indent":
            lines[at] = " " * draw(st.integers(1, 3)) + lines[at]
        elif action == "dedent":
            lines[at] = lines[at][draw(st.integers(1, 3)):]
        elif action == "replace":
            lines[at] = draw(st.sampled_from(_TRICKY_LINES))
        elif action == "insert":
            lines.insert(at, draw(st.sampled_from(_TRICKY_LINES)))
        else:
            cut = draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:cut] + draw(_yaml_bits) + lines[at][cut:]
    return "\n".join(lines)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_every_read_is_what_load_mesh_reads(data: st.DataObject) -> None:
    """A reader given a valid mesh, then an edit of it (a mutation of the data, written in any
    style), then a damaged text, then the edit again: each read agrees with load_mesh."""
    reader = MeshReader()
    base = fleet(data.draw(st.integers(0, 4)))
    first = data.draw(rendered(base))
    agree(reader, first)
    edit = data.draw(mutated())
    if isinstance(edit.get("services"), dict):
        for name, service in base["services"].items():
            if name.startswith("svc-"):
                edit["services"][name] = service
    second = data.draw(rendered(edit))
    agree(reader, second)
    third = data.draw(damaged(second))
    agree(reader, third)
    agree(reader, second)
    agree(reader, data.draw(damaged(first)))


@st.composite
def style(draw: st.DrawFn) -> dict[str, Any]:
    return {"sort_keys": draw(st.booleans()), "default_flow_style": draw(st.sampled_from([False, None])),
            "indent": draw(st.sampled_from([2, 4])), "width": draw(st.sampled_from([30, 80, 4096]))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_edits_an_operator_makes_read_as_load_mesh_reads_them(data: st.DataObject) -> None:
    """Valid edits in the file's own style (an endpoint, a service added, removed, renamed or
    moved, a retry policy): each read agrees with load_mesh and reuses the untouched services."""
    reader = MeshReader()
    how = data.draw(style())
    mesh = fleet(data.draw(st.integers(1, 6)))
    agree(reader, yaml.safe_dump(mesh, **how))
    for _ in range(data.draw(st.integers(1, 4))):
        names = [n for n in mesh["services"] if n.startswith("svc-")]
        if not names:
            break
        name = data.draw(st.sampled_from(names))
        action = data.draw(st.sampled_from(["endpoint", "add", "remove", "rename", "move", "retries"]))
        services = mesh["services"]
        if action == "endpoint":
            services[name]["endpoints"][0]["port"] = data.draw(st.integers(1, 65535))
        elif action == "add":
            services[f"new-{len(services)}"] = {"endpoints": [{"address": "10.3.0.1", "port": 9000}]}
        elif action == "remove":
            del services[name]
        elif action == "rename":
            services[name + "-renamed"] = services.pop(name)
        elif action == "move":
            services[name] = services.pop(name)
        else:
            services[name]["retries"] = {"attempts": data.draw(st.integers(0, 10))}
        kind, _ = agree(reader, yaml.safe_dump(mesh, **how))
        if kind == "mesh":  # (an invalid edit is read by load_mesh, which reports its errors)
            assert reader.reused >= len(services) - 1, (action, reader.reused)


def test_an_edit_reads_again_only_the_service_it_changed() -> None:
    data = fleet(40)
    reader = MeshReader()
    first = agree(reader, yaml.safe_dump(data))[1]
    data["services"]["svc-7"]["endpoints"].append({"address": "10.9.9.9", "port": 8080})
    second = agree(reader, yaml.safe_dump(data))[1]
    assert reader.reused == entries(data) - 1
    assert second.services["svc-7"] is not first.services["svc-7"]
    assert all(second.services[n] is first.services[n] for n in data["services"] if n != "svc-7")
    # A comment or a blank line between services changes no service.
    text = yaml.safe_dump(data).replace("  svc-8:", "  # the next one\n\n  svc-8:")
    agree(reader, text)
    assert reader.reused >= entries(data) - 1


@pytest.mark.parametrize("change", [
    pytest.param(lambda t: t.replace("  svc-1:\n", "  svc-1: &shared\n", 1).replace(
        "  svc-2:\n    endpoints:", "  svc-2:\n    <<: *shared\n    endpoints:", 1), id="an alias across services"),
    pytest.param(lambda t: t.replace("\n", "\r\n"), id="CRLF line ends"),
    pytest.param(lambda t: t.replace("    retries:", "\tretries:", 1), id="a tab"),
    pytest.param(lambda t: "services: {" + t.split("services:", 1)[1].replace("\n", " ") + "}", id="flow style"),
    pytest.param(lambda t: t.replace("      port: 8080", "      port: 99999", 1), id="an invalid port"),
    pytest.param(lambda t: t + "services: {}\n", id="services twice"),
    pytest.param(lambda t: t.replace("  svc-3:", "  svc-2:", 1), id="a service twice"),
    pytest.param(lambda t: t.replace("  svc-2:\n", '  svc-2:\n    protocol: "http1\n  "\n', 1), id="a quoted scalar cut"),
])
def test_texts_it_cannot_cut_or_that_are_invalid_read_as_load_mesh_reads_them(change: Any) -> None:
    data = fleet(5)
    text = yaml.safe_dump(data, sort_keys=False)
    reader = MeshReader()
    agree(reader, text)
    agree(reader, change(text))
    agree(reader, text)


_SMALL = ("mesh: {trust_domain: example.org}\nservices:\n  a: {endpoints: [{address: 10.0.0.1, port: 80}]}\n"
          "  b:\n    endpoints:\n      - address: 10.0.0.2\n        port: 81\n  c: {endpoints: [{address: 10.0.0.3, port: 80}]}\n"
          "gateways: {}\n")


@pytest.mark.parametrize("edited", [
    # Found by an adversarial review: pieces that read alone as something the whole text is not.
    pytest.param(_SMALL.replace("  c:", "  {n: {}}\n  c:"), id="a flow mapping as an entry"),
    pytest.param(_SMALL.replace("  c:", "  &q {n: {}}\n  c:"), id="an anchored flow mapping as an entry"),
    pytest.param(_SMALL.replace("  c:", "  !!map {n: {}}\n  c:"), id="a tagged flow mapping as an entry"),
    pytest.param(_SMALL.replace("services:\n", "services:#c\n"), id="a key glued to a hash"),
    pytest.param(_SMALL.replace("gateways: {}\n", "  d:\n    connect_timeout: |3-\n       2s\n        \n# end\n"),
                 id="a block scalar ending in a line of spaces"),
    pytest.param(_SMALL.replace("gateways: {}\n", "  d:\n    connect_timeout: >1-\n      2s\n      # c\n    # c\n"),
                 id="a folded scalar ending in comment-like content"),
    pytest.param(_SMALL.replace("gateways: {}\n", "  d:\n    protocol: |+\n      http1\n\n\ngateways: {}\n"),
                 id="a kept block scalar before the next section"),
    pytest.param(_SMALL.replace("  c:", "  <<: {x: {endpoints: []}}\n  c:"), id="a merge key among the entries"),
    pytest.param(_SMALL.replace("  c:", "  ? k\n  : {endpoints: []}\n  c:"), id="an explicit key"),
    pytest.param(_SMALL.replace("  b:", "  &x b:"), id="an anchored name"),
    pytest.param("# header\n---\n" + _SMALL + "...\n", id="document markers"),
    # One anchor name in two pieces (YAML refuses it; pieces read alone would not see it).
    pytest.param(_SMALL.replace("  a: {", "  a: &x {").replace("  c: {", "  c: &x {"), id="an anchor name twice"),
    pytest.param(_SMALL.replace("mesh: {", "mesh: &x {").replace("  c: {", "  c: &x {"), id="an anchor name in two sections"),
    pytest.param(_SMALL.replace("  c: {endpoints:", "  c: {connect_timeout: &t 2s, endpoints:").replace(
        "  a: {endpoints:", "  a: {timeout: &t 1s, endpoints:"), id="an anchor name twice inside entries"),
    # A directive changes what the pieces after it mean.
    pytest.param("%TAG !! tag:x:\n---\n" + _SMALL.replace("  a: {", "  a: !!map {"), id="a TAG directive"),
    pytest.param("%YAML 1.1\n---\n" + _SMALL, id="a YAML directive"),
    pytest.param(_SMALL + "#" + "x" * (32 * 1024 * 1024) + "\n", id="over the size limit"),
    # A `services:` line inside a scalar that spans it, the real key spelled another way below.
    pytest.param('mesh: {trust_domain: example.org}\ntelemetry:\n  access_log: {path: "/x\nservices:\n'
                 '  a: {endpoints: [{address: 10.0.0.1, port: 80}]}\n"}\n"services": {}\n', id="a key inside a flow scalar"),
    pytest.param('mesh: {trust_domain: example.org}\ntelemetry:\n  access_log:\n    path: "/x\nservices:\n'
                 '  a: {endpoints: [{address: 10.0.0.1, port: 80}]}\n  "\n\'services\': {}\n', id="a key inside a quoted scalar"),
    pytest.param(_SMALL.replace("gateways: {}\n", "gateways:\n  edge:\n    listen: {address: 127.0.0.1, port: 10000}\n"
                                                   "    routes: [{prefix: /, service: a}]\n"), id="a gateway entry"),
])
def test_pieces_that_read_differently_alone_are_read_as_load_mesh_reads_them(edited: str) -> None:
    reader = MeshReader()
    agree(reader, _SMALL)
    agree(reader, edited)
    agree(reader, _SMALL)
    agree(MeshReader(), edited)


@pytest.mark.parametrize("given", [b"services: {}\n", None, 3])
def test_what_is_not_text_is_refused_as_load_mesh_refuses_it(given: Any) -> None:
    assert outcome(MeshReader().read, given) == outcome(load_mesh, given)


def test_one_anchor_within_an_entry_is_read_incrementally() -> None:
    text = _SMALL.replace("  b:\n    endpoints:", "  b:\n    timeout: &t 2s\n    connect_timeout: *t\n    endpoints:")
    reader = MeshReader()
    agree(reader, text)
    agree(reader, text.replace("port: 81", "port: 82"))
    assert reader.reused == 2  # a and c


def test_gateway_and_policy_edits_reuse_every_other_entry() -> None:
    data = fleet(10)
    reader = MeshReader()
    first = agree(reader, yaml.safe_dump(data))[1]
    data["gateways"]["edge"]["routes"][0]["timeout"] = "3s"
    data["authorization"]["reviews"]["default"] = "allow"
    second = agree(reader, yaml.safe_dump(data))[1]
    assert reader.reused == entries(data) - 2
    assert second.gateways["edge"] is not first.gateways["edge"]
    assert all(second.services[n] is first.services[n] for n in data["services"])


def test_the_file_source_reads_an_edit_incrementally(tmp_path: Any) -> None:
    from xdsd.sources.file import FileSource

    data = fleet(20)
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(data))
    source = FileSource(path)
    first = source.load()
    data["services"]["svc-3"]["retries"] = {"attempts": 5}
    path.write_text(yaml.safe_dump(data))
    second = source.load()
    assert isinstance(first, Mesh) and isinstance(second, Mesh)
    assert second == load_mesh(path.read_text())
    assert second.services["svc-3"].retries is not None and second.services["svc-3"].retries.attempts == 5
    assert source._reader.reused == entries(data) - 1
