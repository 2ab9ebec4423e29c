"""Property: whatever text or data the mesh loader is given, it returns a Mesh or raises MeshError
(never another exception), and every Mesh it accepts can be generated and serialized for every
node of the mesh (each sidecar service and gateway) without an exception."""

from __future__ import annotations

import copy
import math
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xdsd.errors import MeshError
from xdsd.generators import NodeGroup, generate
from xdsd.model import Mesh, load_mesh, parse_mesh
from xdsd.model.load import INTERNAL_ERROR

# Every part of the model at once: sidecars, gateways, traffic policy, telemetry, authorization.
BASE_TEXT = """
mesh: {trust_domain: example.org, cert_lifetime: 1h}
services:
  reviews:
    endpoints:
      - {address: 10.0.0.1, port: 15006, zone: zone-a, labels: {version: v1}}
      - {address: 10.0.0.2, port: 15006, zone: zone-b, labels: {version: v2}, weight: 3}
    sidecar: {inbound: {port: 15006}, app_port: 9080, upstreams: {ratings: 9081}}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    retries: {attempts: 3, retry_on: [5xx, retriable-status-codes], status_codes: [503], per_try_timeout: 1s,
              backoff: {base: 25ms, max: 250ms}}
    timeout: 5s
    load_balancer: {policy: ring_hash, hash_on: {header: x-user}, panic_threshold: 50}
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 10}
    circuit_breakers: {max_connections: 100, retry_budget: {percent: 20, min_concurrency: 3}}
    health_check: {path: /health, interval: 5s, timeout: 1s}
    routes:
      - {prefix: /, headers: {x-canary: "yes"}, subset: v2}
      - {prefix: /, split: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]}
  ratings:
    protocol: http2
    endpoints: [{address: ratings.internal, port: 8080, zone: zone-a}]
  productpage:
    sidecar:
      inbound: {address: 10.0.1.1, port: 15006}
      app_port: 9080
      upstreams: {reviews: 9082, ratings: 9083}
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {path: /ratings, methods: [GET, HEAD], service: ratings, timeout: 2s}
      - {regex: "/items/[0-9]+", service: reviews, subset: v1}
      - prefix: /api/
        service: ratings
        rewrite: {prefix: /v1/, host: ratings.internal}
        mirror: {service: reviews, subset: v2, percent: 10}
        fault: {delay: {duration: 200ms, percent: 5}, abort: {status: 503, percent: 1}}
        retries: {attempts: 2}
      - prefix: /
        split: [{service: reviews, subset: v1, weight: 50}, {service: productpage, weight: 50}]
authorization:
  reviews:
    default: deny
    rules:
      - {name: pages, allow: {from: [productpage], methods: [GET], paths: ["/reviews/*"]}}
      - {name: admin, deny: {paths: [/admin], headers: {x-debug: "1"}}}
telemetry:
  stats: {port: 15090}
  access_log: {path: /dev/stdout}
  tracing: {collector: 127.0.0.1:4317, sampling: 50}
"""
BASE: dict[str, Any] = yaml.safe_load(BASE_TEXT)


def serve_everything(mesh: Mesh) -> None:
    """Generate and serialize the resources of every node the mesh has, as a proxy of each role
    would get them (and one in a zone), and check that no two resources of a type share a name."""
    nodes = [name for name, svc in mesh.services.items() if svc.sidecar is not None] + list(mesh.gateways)
    for name in nodes:
        for group in (NodeGroup(cluster=name), NodeGroup(cluster=name, zone="zone-a")):
            out = generate(mesh, group)
            for type_url, messages in out.items():
                names = []
                for message in messages:
                    if hasattr(message, "SerializeToString"):
                        message.SerializeToString()
                        message.SerializeToString(deterministic=True)
                    names.append(getattr(message, "name", None) or getattr(message, "cluster_name", ""))
                assert len(names) == len(set(names)), (type_url, names)


def check_contract(load: Any, arg: Any) -> Mesh | None:
    try:
        mesh = load(arg)
    except MeshError as exc:
        assert exc.errors
        for err in exc.errors:
            assert INTERNAL_ERROR not in err.message, err
            str(err).encode("utf-8")  # printable and loggable
        return None
    assert isinstance(mesh, Mesh)
    serve_everything(mesh)
    return mesh


def test_the_base_mesh_is_valid_and_served() -> None:
    mesh = check_contract(load_mesh, BASE_TEXT)
    assert mesh is not None and len(mesh.services) == 3


# --- arbitrary text --------------------------------------------------------------------------

_yaml_bits = st.sampled_from([
    "\n", " ", "  ", ":", ": ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!int ", "!!str ", "!!binary ",
    "<<: ", "? ", "|", ">", "#", "'", '"', "\\", "\\ud800", "\\0", "---", "...", "%YAML 1.1\n", "0x", "1e400",
    ".nan", "~", "null", "services", "gateways", "endpoints", "address", "port", "xds_cluster", "10.0.0.1",
    "\t", "\ufeff", "é", "\x00", "\x85",
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_yaml_bits, max_size=60).map("".join)))
def test_any_text_is_a_mesh_or_a_mesh_error(text: str) -> None:
    check_contract(load_mesh, text)


# --- valid meshes, mutated -------------------------------------------------------------------

_hostile = st.sampled_from([
    "", "\n", "a\n", "127.0.0.1\n", "reviews\n", "\ud800", "a\x00b", "\x7f", "xds_cluster", "xdsd-admin",
    "xdsd-otel-collector", "xdsd_authz", "reviews", "ratings", "productpage", "edge", "v1", "v2", "/", "*",
    "(", "fe80::1%eth0", "0.0.0.0", "::", "::1", "localhost", "1s", "0s", "1ns", "8761h", "9223372036s",
    "100%", "%REQ(:PATH)%", "x" * 5000, "GET", "spiffe://example.org/service/reviews", "a|b", "a~b",
    0, -1, 1, 2, 100, 101, 65535, 65536, 2**32, 2**63, 2**64, 10**30, 0.5, -0.5, math.nan, math.inf, True, False,
    None, [], {}, [[[]]], {"a": {"b": {}}},
])
# Values that are valid somewhere in a mesh: most mutations with them keep the mesh valid, so the
# generators see many accepted meshes.
_plausible = st.sampled_from([
    "reviews", "ratings", "productpage", "edge", "v1", "v2", "10.0.0.9", "::1", "ratings.internal", "/x", "/",
    "250ms", "2s", "1m", "1h", "GET", "POST", "x-user", "zone-a", "zone-b", "yes", "/items/[a-z]+",
    1, 3, 10, 50, 100, 503, 8080, 15006, 0.5, 12.5,
])
_values = st.one_of(_plausible, _plausible, _hostile, st.text(max_size=12), st.integers(), st.floats(),
                    st.booleans(), st.none())


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same kind as ``value``: a mutation that often keeps the mesh valid."""
    kinds = [_plausible, _hostile]
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int | float):
        return st.one_of(*(k.filter(lambda v: isinstance(v, int | float) and not isinstance(v, bool)) for k in kinds),
                         st.integers(-10, 70000), st.floats())
    return st.one_of(*(k.filter(lambda v: isinstance(v, str)) for k in kinds), st.text(max_size=12))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)[1:]
        if not paths:
            break
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add", "copy", "copy"]))
        # Mostly leaves (the values), anywhere in the mesh: an index rather than sampled_from,
        # which would favour the first paths (the top-level sections).
        leaves = [p for p in paths if not isinstance(_get(data, p), dict | list)] or paths
        pool = leaves if action in ("replace", "copy") else paths
        path = pool[draw(st.integers(0, len(pool) - 1))]
        parent, last = _get(data, path[:-1]), path[-1]
        if action == "replace":
            parent[last] = draw(st.one_of(_like(parent[last]), _like(parent[last]), _values))
        elif action == "delete":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(_hostile.filter(lambda v: isinstance(v, str)) | st.text(max_size=8))] = parent.pop(last)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(_hostile.filter(lambda v: isinstance(v, str)) | st.text(max_size=8))] = draw(_values)
        elif action == "add" and isinstance(parent, list):
            parent.append(draw(_values))
        elif action == "copy":  # a valid value from elsewhere in the mesh
            parent[last] = copy.deepcopy(_get(data, draw(st.sampled_from(paths))))
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_data_is_a_mesh_or_a_mesh_error(data: dict[str, Any]) -> None:
    check_contract(parse_mesh, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.lists(st.tuples(st.integers(0, 10_000), _yaml_bits), max_size=3))
def test_mutated_yaml_is_a_mesh_or_a_mesh_error(data: dict[str, Any], edits: list[tuple[int, str]]) -> None:
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)  # not representable as YAML
        raise
    for at, bit in edits:  # then damage the text itself
        at %= len(text) + 1
        text = text[:at] + bit + text[at:]
    check_contract(load_mesh, text)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), _hostile)
_structures = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=10), _plausible), inner,
                                                                max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_structures, st.sampled_from(["", "services", "gateways", "telemetry", "mesh", "authorization"]))
def test_arbitrary_structures_are_a_mesh_or_a_mesh_error(value: Any, section: str) -> None:
    check_contract(parse_mesh, value if not section else {section: value})
    try:
        text = yaml.safe_dump({section: value} if section else value, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    check_contract(load_mesh, text)


# --- the two YAML readers agree ---------------------------------------------------------------

def _careful(text: str) -> Any:
    """What the pure-Python reader makes of ``text``: its data, or its MeshError's messages."""
    from xdsd.model import load

    saved = load._HAVE_LIBYAML
    load._HAVE_LIBYAML = False
    try:
        return load._load_yaml(text)
    except MeshError as exc:
        return ("error", [str(e) for e in exc.errors])
    finally:
        load._HAVE_LIBYAML = saved


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to itself and int/float/bool told apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _damaged(edits: list[tuple[int, str]]) -> str:
    text = BASE_TEXT
    for at, bit in edits:
        at %= len(text) + 1
        text = text[:at] + bit + text[at:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_yaml_bits, max_size=60).map("".join),
                 _structures.map(lambda v: yaml.safe_dump({"services": v}, allow_unicode=True)),
                 st.lists(st.tuples(st.integers(0, 10_000), _yaml_bits), min_size=1, max_size=3).map(_damaged)))
def test_the_fast_reader_accepts_only_what_the_careful_one_reads_the_same(text: str) -> None:
    """libyaml reads valid documents; anything it cannot read, or any document with a problem,
    goes to the careful reader, so errors and their paths are the careful reader's. The one
    difference allowed is syntax: libyaml, the reference parser, takes some text PyYAML refuses
    (a tab after a token, ``{t? a: b}``); every rule of ours (tags, keys, sizes) holds on both,
    and where both read a document they read the same data."""
    from xdsd.model import load

    if not load._HAVE_LIBYAML:
        return
    fast = load._load_fast(text)
    careful = _careful(text)
    if fast is load._SLOW:
        return
    if isinstance(careful, tuple) and careful and careful[0] == "error":
        assert all(m.startswith("not valid YAML: ") for m in careful[1]), careful
        return
    assert _same(fast, careful), (fast, careful)


def test_the_fast_reader_is_used_for_a_valid_mesh_and_agrees() -> None:
    from xdsd.model import load

    fast = load._load_fast(BASE_TEXT)
    assert fast is not load._SLOW
    assert _same(fast, _careful(BASE_TEXT))
