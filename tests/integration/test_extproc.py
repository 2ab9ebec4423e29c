"""External processing with real Envoys: processors named in the mesh (built-in and from a module of
this test tree) run by xdsd as Envoy's ext_proc service, on gateway routes and on a sidecar's
inbound side."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS, MeshFile
from tests.support.otlp import OtlpReceiver, Span
from tests.support.ports import free_port_on
from tests.support.procs import free_port
from tests.support.traffic import Client
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

USER = "tests.integration.extproc_processors"


def gateway_mesh(host: str, port: int, edge: int) -> str:
    return f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {edge}}}
    routes:
      - prefix: /headers
        service: web
        processing:
          processor: set-headers
          phases: [request_headers, response_headers]
          args:
            request: {{set: {{x-added: "{{method}} {{path}} {{header.x-word}}"}}, remove: [x-drop]}}
            response: {{set: {{x-resp: "yes"}}}}
      - prefix: /redact
        service: web
        processing:
          processor: json-redact
          phases: [response_headers, response_body]
          args: {{drop: [headers.x-secret], mask: [method]}}
      - prefix: /schema
        service: web
        processing:
          processor: json-schema
          phases: [request_headers, request_body]
          args:
            schema: {{type: object, required: [name], properties: {{name: {{type: string, pattern: '^([a-z]+)+$'}}}}}}
      - {{prefix: /user, service: web, processing: {{processor: "{USER}:shout", args: {{greeting: hi}}}}}}
      - {{prefix: /closed, service: web, processing: {{processor: "{USER}:boom", failure: closed}}}}
      - {{prefix: /open, service: web, processing: {{processor: "{USER}:boom", failure: open}}}}
      - {{prefix: /slow, service: web, processing: {{processor: "{USER}:slow", timeout: 300ms}}}}
      - {{prefix: /, service: web}}
"""


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_gateway_routes_run_their_processors(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    pool: str,
) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    host, port = ups.address("web")
    edge = free_port()
    mesh_file.write(gateway_mesh(host, port, edge))
    server = xdsd(extra_args=["--processor-pool", pool])
    envoy = envoy_factory(server, "edge-1", "edge", mode=ADS)
    client = Client(f"http://127.0.0.1:{edge}/")
    envoy.wait_for(lambda: client.get("/x").status == 200, "gateway serves", 30)

    # set-headers: the upstream sees the added header and not the removed one; the client the response's.
    r = client.request("GET", "/headers/a?q=1", headers={"x-word": "hello", "x-drop": "secret"})
    assert r.status == 200, r.body
    seen = r.json()["headers"]
    assert seen["x-added"] == "GET /headers/a?q=1 hello"
    assert "x-drop" not in seen
    assert r.headers.get("x-resp") == "yes"

    # json-redact: the upstream's JSON answer loses a field and has another masked.
    r = client.request("GET", "/redact/1", headers={"x-secret": "s3cr3t", "x-kept": "k"})
    assert r.status == 200, r.body
    body = r.json()
    assert "x-secret" not in body["headers"] and body["headers"]["x-kept"] == "k"
    assert body["method"] == "***"
    assert int(r.headers.get("content-length", len(r.body))) == len(r.body)  # Envoy may send it chunked

    # json-schema: a bad body is refused with 400 and the validation message; a good one passes.
    bad = client.request("POST", "/schema", headers={"content-type": "application/json"}, body=b'{"name": 5}')
    assert bad.status == 400
    assert bad.json()["error"] == "5 is not of type 'string'" and bad.json()["path"] == "$.name"
    assert client.request("POST", "/schema", body=b"not json").status == 400
    good = client.request("POST", "/schema", headers={"content-type": "application/json"}, body=b'{"name": "x"}')
    assert good.status == 200 and good.json()["method"] == "POST"
    # The review's probe: a pattern that backtracks exponentially in Python's re (which held the GIL,
    # stalling xdsd's loop for seconds past the 200 ms timeout) is matched by RE2: answered 400 at once.
    server.admin_get("/debug/loop?reset=1")
    evil = client.request("POST", "/schema", headers={"content-type": "application/json"},
                          body=json.dumps({"name": "a" * 30 + "!"}).encode())
    assert evil.status == 400 and "does not match" in evil.json()["error"], evil.body
    assert json.loads(server.admin_get("/debug/loop"))["max_stall_seconds"] < 2.0  # Python's re: ~60 s

    # A user processor from a module of the test tree, with its args.
    seen = client.request("GET", "/user", headers={"x-word": "quiet"}).json()["headers"]
    assert seen["x-shouted"] == "QUIET" and seen["x-greeting"] == "hi"

    # A processor that raises: closed -> 5xx; open -> the request passes untouched.
    closed = client.request("GET", "/closed", headers={"x-word": "w"})
    assert closed.status == 500 and b"processor" in closed.body
    opened = client.request("GET", "/open/1", headers={"x-word": "w"})
    assert opened.status == 200 and opened.json()["path"] == "/open/1" and opened.json()["headers"]["x-word"] == "w"

    # A slow processor is cut at its timeout (closed: 504).
    slow = client.request("GET", "/slow")
    assert slow.status == 504, slow.body

    # Counted per processor, and the ext_proc filters are in the gateway's listener.
    metrics = server.metrics_text()
    assert f'xdsd_processor_errors_total{{processor="{USER}:boom"}} 2.0' in metrics
    assert f'xdsd_processor_timeouts_total{{processor="{USER}:slow"}} 1.0' in metrics
    assert 'xdsd_processor_calls_total{phase="request_body",processor="json-schema"}' in metrics
    dump = json.dumps(envoy.config_dump("dynamic_listeners"))
    assert dump.count("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor") == 7
    # Routes without a step are not processed.
    plain = client.request("GET", "/plain", headers={"x-drop": "kept"}).json()["headers"]
    assert plain["x-drop"] == "kept" and "x-added" not in plain

    # With xdsd gone, Envoy applies the same failure modes itself: closed refuses, open passes.
    server.stop()
    envoy.wait_for(lambda: client.request("GET", "/closed").status >= 500, "closed fails without xdsd", 30)
    passed = client.request("GET", "/open/2", headers={"x-word": "w"})
    assert passed.status == 200 and passed.json()["path"] == "/open/2"
    assert client.request("GET", "/plain").status == 200


def test_a_service_step_runs_on_its_sidecars_inbound_side_with_the_callers_identity(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
) -> None:
    """edge gateway -> (mTLS) -> web's sidecar: web's step sees the gateway's verified SPIFFE ID."""
    ups = upstreams({"web": "127.0.0.3"})
    host, app_port = ups.address("web")
    inbound, edge = free_port_on(host), free_port()
    text = f"""
mesh: {{trust_domain: example.org}}
services:
  web:
    sidecar: {{inbound: {{address: {host}, port: {inbound}}}, app_address: {host}, app_port: {app_port}}}
    processing:
      processor: set-headers
      args: {{request: {{set: {{x-caller: "{{caller}}"}}, remove: [x-forwarded-client-cert]}}}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {edge}}}, routes: [{{prefix: /, service: web}}]}}
"""
    mesh_file.write(text)
    server = xdsd()
    envoy_factory(server, "web-1", "web", mode=ADS)
    gateway = envoy_factory(server, "edge-1", "edge", mode=ADS)
    client = Client(f"http://127.0.0.1:{edge}/")
    gateway.wait_for(lambda: client.get("/x").status == 200, "gateway -> web sidecar serves", 30)
    seen = client.request("GET", "/x", headers={"x-caller": "forged"}).json()["headers"]
    assert seen["x-caller"] == "spiffe://example.org/gateway/edge"
    assert "x-forwarded-client-cert" not in seen
    assert 'xdsd_processor_calls_total{phase="request_headers",processor="set-headers"}' in server.metrics_text()

    # An invalid edit (a processor that cannot be imported) is refused by field path; the step keeps working.
    mesh_file.write(text.replace("processor: set-headers", "processor: 'no_such_module:f'"))
    server.wait_for(lambda: "services.web.processing.processor: cannot import 'no_such_module'"
                    in server.admin_get("/debug/config"), "the edit is refused", 30)
    assert client.request("GET", "/y").json()["headers"]["x-caller"] == "spiffe://example.org/gateway/edge"


def test_each_processed_phase_is_a_span_in_the_requests_trace(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
) -> None:
    with OtlpReceiver() as otlp:
        ups = upstreams({"web": "127.0.0.2"})
        host, port = ups.address("web")
        edge = free_port()
        mesh_file.write(f"""
telemetry: {{tracing: {{collector: "{otlp.endpoint}", sampling: 100}}}}
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {edge}}}
    routes:
      - prefix: /
        service: web
        processing:
          processor: set-headers
          phases: [request_headers, response_headers]
          args: {{request: {{set: {{x-a: "1"}}}}, response: {{set: {{x-b: "2"}}}}}}
""")
        server = xdsd(extra_args=["--otlp-endpoint", otlp.endpoint])
        envoy = envoy_factory(server, "edge-1", "edge", mode=ADS)
        client = Client(f"http://127.0.0.1:{edge}/")
        envoy.wait_for(lambda: client.get("/x").status == 200, "gateway serves", 30)
        r = client.request("GET", "/traced")
        assert r.status == 200 and r.headers.get("x-b") == "2"
        trace_id = r.json()["headers"]["traceparent"].split("-")[1]

        def processed(spans: list[Span]) -> list[Span] | None:
            mine = [s for s in spans if s.trace_id == trace_id and s.name == "xdsd.processing"]
            return mine if len(mine) >= 2 else None

        spans = otlp.wait_for_spans(processed, "xdsd.processing spans in the request's trace")
        assert sorted(s.attributes["xdsd.processing.phase"] for s in spans) == ["request_headers", "response_headers"]
        assert {s.attributes["xdsd.processing.outcome"] for s in spans} == {"ok"}
        assert all(s.service == "xdsd" and s.parent_span_id for s in spans)  # children of Envoy's gRPC spans
