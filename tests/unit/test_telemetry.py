"""The ``telemetry:`` section: validation errors by field path, and what the generators make of it
(golden: stats listener and admin cluster, collector cluster, access log and tracer in every HCM).

Regenerate the golden after an intended change with
``UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_telemetry.py`` and review the diff."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.json_format import MessageToDict

from xdsd import typeurls
from xdsd.cache import Snapshot
from xdsd.errors import MeshError
from xdsd.generators import MeshGenerator, NodeGroup, generate
from xdsd.generators.memo import Memo
from xdsd.generators.telemetry import ADMIN_CLUSTER, COLLECTOR_CLUSTER, DEFAULT_ADMIN_ADDRESS
from xdsd.model import parse_mesh
from xdsd.model.telemetry import DEFAULT_ACCESS_LOG_FIELDS

GOLDEN = Path(__file__).parent / "golden"

BASE: dict[str, Any] = {
    "telemetry": {
        "stats": {"port": 15090},
        "access_log": {"path": "/dev/stdout"},
        "tracing": {"collector": "127.0.0.1:4317", "sampling": 25},
    },
    "services": {
        "productpage": {"sidecar": {"inbound": {"address": "127.0.0.2", "port": 15006}, "app_port": 9080,
                                    "upstreams": {"reviews": 9081}}},
        "reviews": {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080}},
        "plain": {"endpoints": [{"address": "10.0.0.1", "port": 80}]},
    },
    "gateways": {"edge": {"listen": {"address": "127.0.0.1", "port": 10000},
                          "routes": [{"prefix": "/", "service": "productpage"}]}},
}


def mesh(**telemetry: Any):  # type: ignore[no-untyped-def]
    data = copy.deepcopy(BASE)
    if telemetry:
        data["telemetry"] = telemetry
    return parse_mesh(data)


def errors_of(telemetry: dict[str, Any], extra: dict[str, Any] | None = None) -> list[str]:
    data = copy.deepcopy(BASE)
    data["telemetry"] = telemetry
    data.update(extra or {})
    with pytest.raises(MeshError) as exc:
        parse_mesh(data)
    return [str(e) for e in exc.value.errors]


# -- model ---------------------------------------------------------------------------------------


def test_defaults_and_off_by_default() -> None:
    m = parse_mesh({})
    assert not m.telemetry.enabled
    t = mesh(stats={}, access_log={}, tracing={"collector": "jaeger:4317"}).telemetry
    assert t.stats is not None and t.stats.port == 15090
    assert t.access_log is not None and t.access_log.path == "/dev/stdout" and t.access_log.enabled
    assert t.tracing is not None and t.tracing.sampling == 100.0
    assert (t.tracing.collector_host, t.tracing.collector_port) == ("jaeger", 4317)


@pytest.mark.parametrize(
    ("telemetry", "expected"),
    [
        ({"tracing": {"collector": "127.0.0.1:4317", "sampling": 120}}, "telemetry.tracing.sampling: must be 0..100, got 120"),
        ({"tracing": {"collector": "127.0.0.1:4317", "sampling": -1}}, "telemetry.tracing.sampling: must be 0..100, got -1"),
        ({"tracing": {"collector": "jaeger"}}, "telemetry.tracing.collector: must be HOST:PORT, got 'jaeger'"),
        ({"tracing": {"collector": "jaeger:99999"}}, "telemetry.tracing.collector: port must be 1..65535, got 99999"),
        ({"tracing": {"sampling": 5}}, "telemetry.tracing.collector: Field required"),
        ({"tracing": {"collector": "a:1", "samplin": 5}}, "telemetry.tracing.samplin: unknown field"),
        ({"stats": {"port": 0}}, "telemetry.stats.port: must be 1..65535, got 0"),
        ({"stats": {"address": "nowhere"}}, "telemetry.stats.address: 'nowhere' is not an IP address"),
        ({"access_log": {"path": "relative.log"}}, "telemetry.access_log.path: must be an absolute path, got 'relative.log'"),
        ({"access_log": {"fields": []}}, "telemetry.access_log.fields: must name at least one field"),
        ({"access_log": {"fields": {"path": "PATH"}}}, "telemetry.access_log.fields: 'path': give an Envoy command operator"),
        ({"metrics": {}}, "telemetry.metrics: unknown field"),
    ],
)
def test_validation_errors_name_the_field(telemetry: dict[str, Any], expected: str) -> None:
    assert any(e.startswith(expected) for e in errors_of(telemetry)), errors_of(telemetry)


def test_unknown_access_log_field_lists_the_known_ones() -> None:
    (err,) = errors_of({"access_log": {"fields": ["method", "bogus"]}})
    assert err.startswith("telemetry.access_log.fields: unknown field 'bogus'; known: start_time, service")


def test_stats_port_clashes_are_refused_per_node() -> None:
    # The gateway listens on 127.0.0.1:10000: its stats listener would bind the same address.
    assert errors_of({"stats": {"port": 10000}}) == [
        "telemetry.stats.port: stats port 10000 of 'edge' on 127.0.0.1 is already gateways.edge.listen.port"]
    # productpage's outbound port for reviews is on 127.0.0.1; a stats address of 0.0.0.0 covers it.
    assert errors_of({"stats": {"port": 9081, "address": "0.0.0.0"}}) == [
        "telemetry.stats.port: stats port 9081 of 'productpage' on 0.0.0.0 is already "
        "services.productpage.sidecar.upstreams.reviews"]
    # reviews' inbound listener is on 0.0.0.0:15006.
    assert errors_of({"stats": {"port": 15090, "overrides": {"reviews": {"port": 15006}}}}) == [
        "telemetry.stats.overrides.reviews.port: stats port 15006 of 'reviews' on 0.0.0.0 is already "
        "services.reviews.sidecar.inbound.port"]
    assert errors_of({"stats": {"overrides": {"plain": {"port": 1}, "edge": {}}}}) == [
        "telemetry.stats.overrides.plain: unknown gateway or sidecar service 'plain'",
        "telemetry.stats.overrides.edge: give an address, a port or both",
    ]


# -- generators ----------------------------------------------------------------------------------


def dump(group: NodeGroup, **telemetry: Any) -> dict[str, list[dict[str, object]]]:
    out = generate(mesh(**telemetry), group)
    return {typeurls.short(t): [MessageToDict(m) for m in msgs] for t, msgs in out.items()}


def names(out: dict[str, list[dict[str, Any]]], short: str) -> list[str]:
    return [str(m.get("name") or m.get("clusterName")) for m in out[short]]


@pytest.mark.parametrize("node", ["edge", "productpage"])
def test_telemetry_resources_match_golden(node: str) -> None:
    got = dump(NodeGroup(node, admin_address="127.0.0.1:9902"))
    path = GOLDEN / f"telemetry_{node}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def _hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_every_own_listener_logs_and_traces_and_the_stats_listener_does_not() -> None:
    out = generate(mesh(), NodeGroup("productpage", inbound_address="127.0.0.9"))
    listeners = {lis.name: lis for lis in out[typeurls.LISTENER]}
    assert sorted(listeners) == ["inbound|15006", "outbound|9081|reviews", "stats|15090"]
    for name in ("inbound|15006", "outbound|9081|reviews"):
        hcm = _hcm(listeners[name])
        assert hcm.tracing.provider.name == "envoy.tracers.opentelemetry"
        assert hcm.tracing.random_sampling.value == 25
        (log,) = hcm.access_log
        cfg = file_pb2.FileAccessLog()
        log.typed_config.Unpack(cfg)
        fields = dict(cfg.log_format.json_format.fields)
        assert list(DEFAULT_ACCESS_LOG_FIELDS) == sorted(fields, key=DEFAULT_ACCESS_LOG_FIELDS.index)
        assert fields["service"].string_value == "productpage"
        assert fields["direction"].string_value == name.split("|")[0]
    stats = listeners["stats|15090"]
    # The stats listener follows the instance's own inbound address (node metadata here).
    assert stats.address.socket_address.address == "127.0.0.9"
    assert not _hcm(stats).access_log and not _hcm(stats).HasField("tracing")
    clusters = {c.name: c for c in out[typeurls.CLUSTER]}
    admin = clusters[ADMIN_CLUSTER].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert f"{admin.address}:{admin.port_value}" == DEFAULT_ADMIN_ADDRESS  # no admin address in the metadata
    assert COLLECTOR_CLUSTER in clusters
    Snapshot.build(NodeGroup("productpage"), 1, out)  # consistent: every reference resolves


def test_overrides_and_parts_left_out() -> None:
    out = dump(NodeGroup("edge"), stats={"port": 15090, "overrides": {"edge": {"address": "0.0.0.0", "port": 15091}}})
    assert names(out, "LDS") == ["edge", "stats|15091"]
    assert out["LDS"][1]["address"]["socketAddress"] == {"address": "0.0.0.0", "portValue": 15091}
    assert names(out, "CDS") == ["productpage", ADMIN_CLUSTER]
    edge_hcm = out["LDS"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    assert "tracing" not in edge_hcm and "accessLog" not in edge_hcm
    # Access log off: nothing changes but the tracer.
    out = dump(NodeGroup("edge"), access_log={"enabled": False}, tracing={"collector": "jaeger:4317"})
    hcm = out["LDS"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    assert "accessLog" not in hcm and hcm["tracing"]["randomSampling"] == {"value": 100.0}
    assert out["CDS"][-1]["type"] == "STRICT_DNS"  # a collector by host name
    # A custom field mapping is written as given.
    out = dump(NodeGroup("edge"), access_log={"fields": {"p": "%REQ(:PATH)%", "code": "%RESPONSE_CODE%"}})
    fmt = out["LDS"][0]["filterChains"][0]["filters"][0]["typedConfig"]["accessLog"][0]["typedConfig"]["logFormat"]
    assert fmt == {"jsonFormat": {"p": "%REQ(:PATH)%", "code": "%RESPONSE_CODE%"}}


def test_nodes_outside_the_mesh_and_meshes_without_telemetry_get_nothing_extra() -> None:
    assert all(not v for v in generate(mesh(), NodeGroup("stranger")).values())
    data = copy.deepcopy(BASE)
    del data["telemetry"]
    plain = generate(parse_mesh(data), NodeGroup("productpage"))
    assert [lis.name for lis in plain[typeurls.LISTENER]] == ["inbound|15006", "outbound|9081|reviews"]
    assert not _hcm(plain[typeurls.LISTENER][0]).access_log


def test_memoized_decoration_never_touches_the_shared_listeners() -> None:
    memo = Memo()
    m = mesh()
    first = generate(m, NodeGroup("productpage"), memo=memo)
    memo.sweep()
    again = generate(m, NodeGroup("productpage"), memo=memo)
    assert all(a is b for a, b in zip(first[typeurls.LISTENER], again[typeurls.LISTENER], strict=True))
    # Turning telemetry off gives the undecorated listeners again (the decorated ones were copies).
    data = copy.deepcopy(BASE)
    del data["telemetry"]
    off = generate(parse_mesh(data), NodeGroup("productpage"), memo=memo)
    assert not _hcm(off[typeurls.LISTENER][0]).access_log


def test_readme_example_and_default_fields_match_the_code() -> None:
    from xdsd.model import load_mesh

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Telemetry", 1)[1].split("\n## ", 1)[0]
    example = load_mesh(section.split("```yaml", 1)[1].split("```", 1)[0])
    assert example.telemetry.stats is not None and example.telemetry.tracing is not None
    listed = section.split("The default fields are", 1)[1].split(". `fields`", 1)[0]
    import re

    listed = re.sub(r"\([^)]*\)", "", listed)  # the notes in parentheses
    assert tuple(re.findall(r"`([a-z_]+)`", listed)) == DEFAULT_ACCESS_LOG_FIELDS


def test_bootstrap_carries_the_admin_address() -> None:
    from xdsd.bootstrap import BootstrapOptions, render

    node = render(BootstrapOptions("n1", "edge", admin_address="0.0.0.0", admin_port=9911, xds_plaintext=True))["node"]
    assert node["metadata"]["xdsd.admin_address"] == "127.0.0.1:9911"  # reachable from Envoy itself


def test_a_gateway_with_telemetry_survives_revisions_that_change_its_services() -> None:
    # The gateway's cluster list is memoized across revisions; telemetry used to append to that
    # very list, so the next revision that changed a service failed ("zip() argument 4 is longer").
    from xdsd.cache import SnapshotCache

    cache = SnapshotCache(MeshGenerator())
    cache.watch(NodeGroup("edge"), lambda snap, types: None)
    m = mesh()
    page = m.services["productpage"]
    for timeout in (1.0, 2.0, 1.0):
        changed = page.model_copy(update={"connect_timeout": timeout})
        cache.update(m.model_copy(update={"services": {**m.services, "productpage": changed}}))
        clusters = cache.snapshot(NodeGroup("edge")).get(typeurls.CLUSTER).resources
        assert {"productpage", ADMIN_CLUSTER, COLLECTOR_CLUSTER} <= clusters.keys()
