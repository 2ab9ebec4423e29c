"""Telemetry configured through xdsd, proven with real Envoys: gateway -> productpage (sidecar, app)
-> reviews (sidecar, app), mTLS between them, every Envoy with the mesh's ``telemetry:`` section.

- tracing: one request makes spans in every Envoy on the way, all with ONE trace id, received by an
  OTLP collector this test runs (the productpage app passes ``traceparent`` on, as apps must);
- access logs: JSON lines with the documented default fields on Envoy's stdout;
- stats: ``/stats/prometheus`` on the pushed listener of each sidecar, counters moving with traffic;
- xdsd's own spans (load/validate -> generate -> push -> ACKs) arrive when ``--otlp-endpoint`` is
  given, and the connected-proxies-by-role metric is right.

One mesh for the whole module (module-scoped): starting it once keeps the added time small.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard import dashboard_metric_names
from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import sidecar_mesh
from tests.support.otlp import OtlpReceiver, Span
from tests.support.procs import free_port, free_port_on, wait_for
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.bootstrap import BootstrapOptions, render
from xdsd.model.telemetry import DEFAULT_ACCESS_LOG_FIELDS

TD = "telemetry.test"


@dataclass
class TelemetryMesh:
    otlp: OtlpReceiver
    ups: Upstreams
    xdsd: XdsdProcess
    envoys: dict[str, EnvoyProcess]
    gateway_port: int
    stats_port: int

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.gateway_port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def stats_url(self, address: str, path: str = "/stats/prometheus") -> str:
        return f"http://{address}:{self.stats_port}{path}"


def _mesh_config(ups: Upstreams, gateway_port: int, inbound_port: int, out_port: int, stats_port: int,
                 collector: str) -> dict[str, Any]:
    mesh = sidecar_mesh(ups, inbound_port, {"productpage": {"reviews": out_port}}, services=("productpage", "reviews"),
                        trust_domain=TD)
    return {
        **mesh,
        "telemetry": {
            "stats": {"port": stats_port},
            "access_log": {"path": "/dev/stdout"},
            "tracing": {"collector": collector, "sampling": 100},
        },
        "gateways": {"edge": {"listen": {"address": "127.0.0.1", "port": gateway_port},
                              "routes": [{"prefix": "/", "service": "productpage"}]}},
    }


@pytest.fixture(scope="module")
def tmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryMesh]:
    workdir = tmp_path_factory.mktemp("telemetry")
    (workdir / "upstreams").mkdir()
    with OtlpReceiver() as otlp, Upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3"},
                                           workdir / "upstreams") as ups:
        gateway_port, out_port = free_port(), free_port()
        inbound_port = free_port_on("127.0.0.2", "127.0.0.3")
        stats_port = free_port_on("127.0.0.1", "127.0.0.2", "127.0.0.3")
        config = workdir / "mesh.yaml"
        _write_atomically(config, yaml.safe_dump(_mesh_config(ups, gateway_port, inbound_port, out_port, stats_port,
                                                      otlp.endpoint)))
        # productpage's app calls reviews through its sidecar, passing the trace context on.
        ups.set("productpage", forward_to=f"http://127.0.0.1:{out_port}")
        # reviews asks for its authz decisions over HTTP, productpage over gRPC: both end up as spans.
        authz_http = free_port()
        (workdir / "xdsd").mkdir()
        xdsd = XdsdProcess(config, workdir / "xdsd", extra_args=["--otlp-endpoint", otlp.endpoint,
                                                        "--authz-http-address", f"127.0.0.1:{authz_http}"])
        envoys = EnvoyFactory(workdir)
        try:
            xdsd.start()
            started = {
                name: envoys.from_bootstrap(name, render(BootstrapOptions(
                    node_id=f"{name}-1", cluster=name, xds_port=xdsd.xds_port, admin_port=free_port(),
                    token=xdsd.token(f"{name}-1", name), **xdsd.bootstrap_tls(),
                    authz_http_port=authz_http if name == "reviews" else None)), wait_live=False)
                for name in ("edge", "productpage", "reviews")
            }
            for envoy in started.values():
                envoy.wait_live()
            m = TelemetryMesh(otlp, ups, xdsd, started, gateway_port, stats_port)
            wait_for(lambda: m.get("/warmup")[0] == 200, "gateway -> productpage -> reviews answers 200", 45)
            yield m
        finally:
            envoys.stop_all()
            xdsd.stop()


def _write_atomically(path: Path, text: str) -> None:
    """As editors and config management do: a reader (xdsd) never sees a truncated file, which
    could parse as a smaller, valid mesh (an empty file is an empty mesh)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _traces(spans: list[Span]) -> dict[str, set[str]]:
    """trace id -> the services (Envoys) that reported spans in it."""
    out: dict[str, set[str]] = {}
    for s in spans:
        out.setdefault(s.trace_id, set()).add(s.service)
    return out


def test_one_request_is_one_trace_across_gateway_and_sidecars(tmesh: TelemetryMesh) -> None:
    status, body = tmesh.get("/traced/1")
    assert status == 200 and body["onward"]["status"] == 200, body
    # The id the gateway gave the trace reached reviews' app, two sidecars later.
    traceparent = body["onward"]["body"]["headers"]["traceparent"]
    trace_id = traceparent.split("-")[1]
    assert body["headers"]["traceparent"].split("-")[1] == trace_id

    def roots(spans: list[Span]) -> list[Span]:
        by_id = {s.span_id: s for s in spans}
        return [s for s in spans if not s.parent_span_id or s.parent_span_id not in by_id]

    def complete(spans: list[Span]) -> list[Span] | None:
        # Each Envoy flushes its spans on its own schedule: wait until every hop's span arrived, so
        # that the trace is connected (one root) rather than judging it from a part.
        mine = [s for s in spans if s.trace_id == trace_id]
        if not {"edge", "productpage", "reviews"} <= {s.service for s in mine}:
            return None
        return mine if len(roots(mine)) == 1 else None

    # Inbound and outbound on productpage, inbound on reviews, the gateway: each HCM a span, each a
    # child of the one before (the trace is connected, not only sharing an id).
    spans = tmesh.otlp.wait_for_spans(complete, f"one connected trace {trace_id} from edge, productpage and reviews")
    shown = [(s.service, s.name, s.span_id, s.parent_span_id) for s in spans]
    assert roots(spans)[0].service == "edge", shown
    by_id = {s.span_id: s for s in spans}

    def hops(span: Span) -> list[str]:
        """The services from ``span`` up to the root, each once, nearest first."""
        out: list[str] = []
        while span is not None:
            if not out or out[-1] != span.service:
                out.append(span.service)
            span = by_id.get(span.parent_span_id)  # type: ignore[assignment]
        return out

    # reviews' spans descend from productpage's, which descend from the gateway's.
    assert {tuple(hops(s)) for s in spans if s.service == "reviews"} == {("reviews", "productpage", "edge")}, shown
    assert sum(1 for s in spans if s.service == "productpage") >= 2, shown  # inbound and outbound


def _access_log_lines(envoy: EnvoyProcess) -> list[dict[str, Any]]:
    lines = []
    for line in Path(envoy.log_path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_access_log_lines_carry_the_default_fields(tmesh: TelemetryMesh) -> None:
    status, _ = tmesh.get("/logged/42", headers={"user-agent": "telemetry-test"})
    assert status == 200
    reviews = tmesh.envoys["reviews"]

    def logged() -> dict[str, Any] | None:
        return next((e for e in _access_log_lines(reviews) if e.get("path") == "/logged/42"), None)

    entry = wait_for(logged, "reviews' access log line for /logged/42", 15)
    assert set(entry) == set(DEFAULT_ACCESS_LOG_FIELDS)
    assert entry["service"] == "reviews" and entry["direction"] == "inbound"
    assert entry["method"] == "GET" and entry["response_code"] == 200
    assert entry["downstream_peer_principal"] == f"spiffe://{TD}/service/productpage"
    assert entry["upstream_cluster"].startswith("inbound|")
    assert len(entry["trace_id"]) == 32
    # The gateway logged the same request as direction "gateway", with the same trace id.
    gw = wait_for(lambda: next((e for e in _access_log_lines(tmesh.envoys["edge"])
                                if e.get("path") == "/logged/42"), None), "the gateway's line", 15)
    assert gw["direction"] == "gateway" and gw["service"] == "edge" and gw["trace_id"] == entry["trace_id"]
    assert gw["user_agent"] == "telemetry-test"


def _counter(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_sidecar_stats_are_scrapeable_on_the_pushed_listener_and_move(tmesh: TelemetryMesh) -> None:
    url = tmesh.stats_url("127.0.0.3")  # reviews' stats listener follows its inbound address
    name = "envoy_http_downstream_rq_total"
    before = _counter(_scrape(url), name, envoy_http_conn_manager_prefix="inbound_reviews")
    for i in range(5):
        assert tmesh.get(f"/counted/{i}")[0] == 200
    wait_for(lambda: _counter(_scrape(url), name, envoy_http_conn_manager_prefix="inbound_reviews") >= before + 5,
             "reviews' inbound request counter up by 5", 15)
    # productpage's own stats port on its own address; the gateway's on 127.0.0.1.
    assert _counter(_scrape(tmesh.stats_url("127.0.0.2")), name, envoy_http_conn_manager_prefix="outbound_reviews") >= 5
    assert _counter(_scrape(tmesh.stats_url("127.0.0.1")), name, envoy_http_conn_manager_prefix="edge") >= 5
    # Only the Prometheus page: the rest of the admin API is not reachable through the stats port.
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(tmesh.stats_url("127.0.0.3", "/quitquitquit"), timeout=5)
    assert exc.value.code == 404


def test_authz_decisions_are_spans_in_the_callers_trace(tmesh: TelemetryMesh) -> None:
    status, body = tmesh.get("/authz-traced")
    assert status == 200
    trace_id = body["onward"]["body"]["headers"]["traceparent"].split("-")[1]

    def decided(spans: list[Span]) -> list[Span] | None:
        mine = [s for s in spans if s.trace_id == trace_id and s.service == "xdsd" and s.name == "xdsd.authz"]
        return mine if len(mine) >= 2 else None  # productpage's and reviews' inbound checks

    spans = tmesh.otlp.wait_for_spans(decided, "xdsd.authz spans in the request's trace")
    assert {s.attributes["xdsd.authz.service"] for s in spans} == {"productpage", "reviews"}
    assert {s.attributes["xdsd.authz.outcome"] for s in spans} == {"allow"}
    assert all(s.parent_span_id for s in spans)  # children of Envoy's ext_authz spans (gRPC and HTTP)


def test_proxies_by_role(tmesh: TelemetryMesh) -> None:
    def by_role() -> dict[str, float]:
        return {labels["role"]: value for labels, value in tmesh.xdsd.metric_samples("xdsd_connected_proxies_by_role")}

    wait_for(lambda: by_role() == {"gateway": 1.0, "sidecar": 2.0, "unknown": 0.0}, "1 gateway, 2 sidecars", 15)


def test_each_revision_is_a_trace_from_load_to_acks(tmesh: TelemetryMesh) -> None:
    """A change that reaches every proxy (the access-log fields are in every listener): its trace
    has the load, generate, push and ACK stages, and the ACKs of all three proxies."""
    config = tmesh.xdsd.config_path
    original = config.read_text()
    data = yaml.safe_load(original)
    before = tmesh.xdsd.metric_value("xdsd_config_revision")
    data["telemetry"]["access_log"]["fields"] = [*DEFAULT_ACCESS_LOG_FIELDS, "route_name"]
    try:
        _write_atomically(config, yaml.safe_dump(data))
        revision = wait_for(lambda: (r := tmesh.xdsd.metric_value("xdsd_config_revision")) > before and r,
                            "a new revision", 15)

        def revision_trace(spans: list[Span]) -> dict[str, Span] | None:
            roots = [s for s in spans if s.name == "xdsd.revision" and s.attributes.get("xdsd.revision") == revision]
            if not roots:
                return None
            stages = {s.name: s for s in spans if s.trace_id == roots[0].trace_id and s.parent_span_id == roots[0].span_id}
            acks = stages.get("xdsd.acks")
            if acks is None or acks.attributes["xdsd.acks"] < 3:
                return None
            return {"root": roots[0], **stages}

        trace = tmesh.otlp.wait_for_spans(revision_trace, f"the trace of revision {revision} with 3 ACKs")
        assert trace["root"].service == "xdsd" and trace["root"].attributes["xdsd.trigger"] == "file"
        assert set(trace) == {"root", "xdsd.load", "xdsd.generate", "xdsd.push", "xdsd.acks"}
        assert trace["xdsd.push"].attributes["xdsd.proxies"] == 3
        assert trace["xdsd.acks"].attributes["xdsd.nacks"] == 0
        assert trace["xdsd.acks"].attributes["xdsd.unacked"] == 0
    finally:
        _write_atomically(config, original)


def test_a_rejected_revision_is_a_failed_trace(tmesh: TelemetryMesh) -> None:
    config = tmesh.xdsd.config_path
    original = config.read_text()
    data = yaml.safe_load(original)
    data["telemetry"]["tracing"]["sampling"] = 120
    try:
        _write_atomically(config, yaml.safe_dump(data))

        def rejected(spans: list[Span]) -> Span | None:
            return next((s for s in spans if s.name == "xdsd.revision" and "xdsd.errors" in s.attributes), None)

        root = tmesh.otlp.wait_for_spans(rejected, "a revision span with errors")
        assert list(root.attributes["xdsd.errors"]) == ["telemetry.tracing.sampling: must be 0..100, got 120"]
        load = next(s for s in tmesh.otlp.snapshot() if s.parent_span_id == root.span_id)
        assert load.name == "xdsd.load"
    finally:
        _write_atomically(config, original)


def test_the_dashboards_envoy_metrics_exist_in_a_real_scrape(tmesh: TelemetryMesh) -> None:
    """The Grafana dashboard (deploy/grafana) queries Envoy metrics by name: each must be in what a
    sidecar's and the gateway's stats listener serve."""
    wait_for(lambda: tmesh.get("/dashboard")[0] == 200, "the gateway answers", 30)
    served: set[str] = set()  # sample names as Prometheus stores them (the exposition's, no _total added)
    for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        for line in _scrape(tmesh.stats_url(address)).splitlines():
            if line and not line.startswith("#"):
                served.add(line.split("{", 1)[0].split(" ", 1)[0])
    wanted = {m for m in dashboard_metric_names() if m.startswith("envoy_")}
    assert wanted and wanted <= served, sorted(wanted - served)
