"""The ext_proc servicer in process (real processors, real worker threads, no Envoy), the worker
pool's timeout, and the Envoy config generated for ``processing:``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from xdsd import typeurls
from xdsd.extproc.runner import ProcessRunner, ThreadRunner
from xdsd.extproc.servicer import ProcessingServicer
from xdsd.generators import generate
from xdsd.model import load_mesh
from xdsd.model.processing import PROCESSING_METADATA
from xdsd.node import NodeGroup

USER = "tests.integration.extproc_processors"

MESH = f"""
services:
  web:
    endpoints: [{{address: 127.0.0.2, port: 15006}}]
    sidecar: {{inbound: {{address: 127.0.0.2, port: 15006}}, app_port: 9080}}
    processing: {{processor: "{USER}:caller"}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes:
      - {{prefix: /closed, service: web, processing: {{processor: "{USER}:boom"}}}}
      - {{prefix: /open, service: web, processing: {{processor: "{USER}:boom", failure: open}}}}
      - {{prefix: /slow, service: web, processing: {{processor: "{USER}:slow", timeout: 50ms}}}}
      - prefix: /redact
        service: web
        processing: {{processor: json-redact, phases: [response_headers, response_body], args: {{drop: [a]}}}}
      - {{prefix: /, service: web}}
"""


class Context:
    def __init__(self, key: str) -> None:
        self.metadata = ((PROCESSING_METADATA, key),)
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)


async def _requests(*messages: ep.ProcessingRequest) -> AsyncIterator[ep.ProcessingRequest]:
    for m in messages:
        yield m


def _headers(**headers: str) -> ep.HttpHeaders:
    out = ep.HttpHeaders()
    for k, v in headers.items():
        out.headers.headers.add(key=k.replace("_", "-"), raw_value=v.encode())
    return out


async def _run(servicer: ProcessingServicer, key: str, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    return [r async for r in servicer.Process(_requests(*messages), Context(key))]  # type: ignore[arg-type]


def _servicer(pool: str = "threads") -> tuple[ProcessingServicer, list[tuple[str, str, str, float]], dict[str, str]]:
    seen: list[tuple[str, str, str, float]] = []
    runner = ProcessRunner(2) if pool == "processes" else ThreadRunner(2)
    servicer = ProcessingServicer(runner, observer=lambda *a: seen.append(a))
    mesh = load_mesh(MESH)
    servicer.set_mesh(mesh)
    keys = {path: key for key, step in servicer._steps.items() for path in [step.path]}
    return servicer, seen, keys


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_failure_modes_timeouts_and_mutations(pool: str) -> None:
    servicer, seen, keys = _servicer(pool)
    await servicer.ready()  # worker processes spawned
    try:
        req = ep.ProcessingRequest(request_headers=_headers(_path="/closed"))
        [closed] = await _run(servicer, keys["gateways.edge.routes[0].processing"], req)
        assert closed.immediate_response.status.code == 500
        [opened] = await _run(servicer, keys["gateways.edge.routes[1].processing"], req)
        assert opened.WhichOneof("response") == "request_headers" and not opened.request_headers.HasField("response")
        start = time.monotonic()
        [slow] = await _run(servicer, keys["gateways.edge.routes[2].processing"], req)
        assert slow.immediate_response.status.code == 504
        assert time.monotonic() - start < 1.5  # answered at the timeout, not when the processor ends
        body = b'{"a": 1, "b": 2}'
        headers, replaced = await _run(
            servicer, keys["gateways.edge.routes[3].processing"],
            ep.ProcessingRequest(response_headers=_headers(content_type="application/json")),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=True)))
        assert headers.WhichOneof("response") == "response_headers"
        common = replaced.response_body.response
        assert common.body_mutation.body == b'{"b":2}'
        assert [(h.header.key, h.header.raw_value) for h in common.header_mutation.set_headers] == [
            ("content-length", b"7")]
        outcomes = [(p, ph, o) for p, ph, o, _ in seen]
        assert outcomes == [(f"{USER}:boom", "request_headers", "error"), (f"{USER}:boom", "request_headers", "error"),
                            (f"{USER}:slow", "request_headers", "timeout"),
                            ("json-redact", "response_headers", "ok"), ("json-redact", "response_body", "ok")]
    finally:
        servicer.close()


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_the_caller_comes_from_the_verified_xfcc_on_a_sidecar_and_unknown_steps_are_refused(pool: str) -> None:
    servicer, _, keys = _servicer(pool)
    await servicer.ready()
    try:
        xfcc = 'By=spiffe://td/service/web;Hash=ab;URI=spiffe://td/service/pp'
        [r] = await _run(servicer, keys["services.web.processing"],
                         ep.ProcessingRequest(request_headers=_headers(x_forwarded_client_cert=xfcc)))
        [option] = r.request_headers.response.header_mutation.set_headers
        assert (option.header.key, option.header.raw_value) == ("x-caller", b"spiffe://td/service/pp")
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        context = Context("gateways.edge.routes[9].processing#0")
        assert [r async for r in servicer.Process(_requests(), context)] == []  # type: ignore[arg-type]
        assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.NOT_FOUND
    finally:
        servicer.close()


async def test_a_timed_out_processor_thread_is_interrupted() -> None:
    runner = ThreadRunner(1)
    stopped = threading.Event()

    def busy() -> None:
        try:
            while True:
                sum(range(100))
        finally:
            stopped.set()

    try:
        outcome = await runner.run(busy, 0.05)
        assert outcome.kind == "timeout"
        assert await asyncio.to_thread(stopped.wait, 10)
        ok = await runner.run(lambda: 42, 5)  # the worker is free again
        assert (ok.kind, ok.value) == ("ok", 42)
    finally:
        runner.close()


def _filters(listener: Any) -> list[Any]:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return list(hcm.http_filters)


@pytest.mark.parametrize("group", [NodeGroup("edge"), NodeGroup("web")])
def test_generated_ext_proc_filters_point_at_xdsd_with_the_steps_mode(group: NodeGroup) -> None:
    mesh = load_mesh(MESH)
    out = generate(mesh, group)
    listener = next(m for m in out[typeurls.LISTENER] if m.name in ("edge", "inbound|15006"))
    filters = [f for f in _filters(listener) if f.typed_config.type_url.endswith("ExternalProcessor")]
    names = [f.name for f in _filters(listener)]
    Mode = processing_mode_pb2.ProcessingMode
    if group.cluster == "web":
        assert names.index("envoy.filters.http.ext_proc") == names.index("envoy.filters.http.ext_authz") + 1
        assert [f.disabled for f in filters] == [False]
    else:
        assert [f.name for f in filters] == [f"envoy.filters.http.ext_proc.routes[{i}]" for i in range(4)]
        assert all(f.disabled for f in filters)
        [rc] = out[typeurls.ROUTE]
        enabled = [list(r.typed_per_filter_config) for r in rc.virtual_hosts[0].routes]
        assert enabled[:4] == [[f"envoy.filters.http.ext_proc.routes[{i}]"] for i in range(4)] and enabled[4] == []
    configs = []
    for f in filters:
        config = ext_proc_pb2.ExternalProcessor()
        f.typed_config.Unpack(config)
        configs.append(config)
        assert config.grpc_service.envoy_grpc.cluster_name == group.xds_cluster
        assert config.grpc_service.initial_metadata[0].key == PROCESSING_METADATA
    if group.cluster == "edge":
        closed, opened, slow, redact = configs
        assert not closed.failure_mode_allow and opened.failure_mode_allow
        assert slow.message_timeout.ToMilliseconds() == 300  # 50 ms + the grace for xdsd's own answer
        assert redact.processing_mode.request_header_mode == Mode.SKIP
        assert redact.processing_mode.response_header_mode == Mode.SEND
        assert redact.processing_mode.response_body_mode == Mode.BUFFERED
        assert redact.processing_mode.request_body_mode == Mode.NONE
        assert closed.grpc_service.initial_metadata[0].value.startswith("gateways.edge.routes[0].processing#")


class _Span:
    def __init__(self, spans: list[dict[str, Any]], metadata: Any) -> None:
        self.attributes: dict[str, Any] = {"parent": dict(metadata).get("traceparent")}
        spans.append(self.attributes)

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)

    def end(self) -> None:
        self.attributes["ended"] = True


async def test_each_processed_phase_is_a_span_in_the_requests_trace() -> None:
    spans: list[dict[str, Any]] = []
    servicer = ProcessingServicer(ThreadRunner(1), span=lambda md: _Span(spans, md))
    servicer.set_mesh(load_mesh(MESH))
    key = next(k for k, step in servicer._steps.items() if step.path == "gateways.edge.routes[3].processing")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = Context(key)
    context.metadata += (("traceparent", parent),)
    try:
        requests = _requests(ep.ProcessingRequest(response_headers=_headers(content_type="application/json")),
                             ep.ProcessingRequest(response_body=ep.HttpBody(body=b'{"a": 1}', end_of_stream=True)))
        assert len([r async for r in servicer.Process(requests, context)]) == 2  # type: ignore[arg-type]
    finally:
        servicer.close()
    assert [(s["parent"], s["xdsd.processing.phase"], s["xdsd.processing.outcome"], s["ended"]) for s in spans] == [
        (parent, "response_headers", "ok", True), (parent, "response_body", "ok", True)]
    assert spans[0]["xdsd.processing.processor"] == "json-redact"


def test_streamed_bodies_and_skipped_phases_in_the_processing_mode() -> None:
    from xdsd.generators.processing import processing_mode
    from xdsd.model.processing import Processing

    mode = processing_mode(Processing(processor="set-headers", phases=["request_body", "response_headers"],
                                      body="streamed"))
    m = processing_mode_pb2.ProcessingMode
    assert (mode.request_header_mode, mode.request_body_mode) == (m.SKIP, m.STREAMED)
    assert (mode.response_header_mode, mode.response_body_mode) == (m.SEND, m.NONE)
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (m.SKIP, m.SKIP)


def test_steps_of_a_rollouts_candidate_are_served_beside_the_current_ones() -> None:
    servicer = ProcessingServicer(ThreadRunner(1))
    current = load_mesh(MESH)
    candidate = load_mesh(MESH.replace("timeout: 50ms", "timeout: 60ms"))
    servicer.set_mesh(current, candidate)
    paths = sorted(step.path for step in servicer._steps.values())
    assert paths.count("gateways.edge.routes[2].processing") == 2  # both versions of the changed step
    assert len(paths) == 6
    servicer.set_mesh(candidate)  # promoted: the previous revision's steps stay for streams in flight
    assert len(servicer._steps) == 5 and len(servicer._previous) == 6


async def test_worker_processes_end_a_sleeping_call_at_its_deadline_and_replace_a_dead_worker() -> None:
    from xdsd.extproc.phase import StepSpec, StreamState

    runner = ProcessRunner(1)
    request = ep.ProcessingRequest(request_headers=_headers(_path="/"))

    def spec(name: str) -> StepSpec:
        return StepSpec(name, f"{USER}:{name}", {}, identity=False, buffered=False)

    async def call(name: str, timeout: float) -> str:
        outcome = await runner.phase(lambda m: None, spec(name), StreamState(), "request_headers", request, timeout)
        return outcome.kind

    try:
        runner.start()
        await runner.ready()
        assert await call("sleepy", 0.2) == "timeout"
        start = time.monotonic()
        assert await call("shout", 3.0) == "ok"  # the one worker was not held for the rest of the sleep
        assert time.monotonic() - start < 3.0
        assert await call("die", 3.0) == "error"
        await runner.ready()  # a new pool, spawned
        assert await call("shout", 10.0) == "ok"
    finally:
        runner.close()


async def test_only_nodes_of_the_steps_gateway_or_service_may_run_it(tmp_path: Path) -> None:
    from xdsd.auth.access import Access
    from xdsd.auth.tokens import TOKEN_HEADER

    access = Access.from_state_dir(tmp_path)
    assert access.signer is not None
    servicer = ProcessingServicer(ThreadRunner(1), access=access)
    servicer.set_mesh(load_mesh(MESH))
    key = next(k for k, step in servicer._steps.items() if step.path == "gateways.edge.routes[1].processing")
    request = ep.ProcessingRequest(request_headers=_headers(_path="/"))

    async def run(token: str | None) -> tuple[grpc.StatusCode | None, int]:
        context = Context(key)
        if token is not None:
            context.metadata += ((TOKEN_HEADER, token),)
        answers = [r async for r in servicer.Process(_requests(request), context)]  # type: ignore[arg-type]
        return (context.aborted[0] if context.aborted else None), len(answers)

    try:
        assert await run(access.signer.issue("edge-1", "edge")) == (None, 1)
        assert await run(access.signer.issue("web-1", "web")) == (grpc.StatusCode.PERMISSION_DENIED, 0)
        assert await run(None) == (grpc.StatusCode.UNAUTHENTICATED, 0)
    finally:
        servicer.close()


async def test_another_owners_step_and_an_unknown_step_get_the_same_refusal(tmp_path: Path) -> None:
    """The caller's ownership is checked before the step's existence: no oracle of step keys."""
    from xdsd.auth.access import Access
    from xdsd.auth.tokens import TOKEN_HEADER

    access = Access.from_state_dir(tmp_path)
    assert access.signer is not None
    servicer = ProcessingServicer(ThreadRunner(1), access=access)
    servicer.set_mesh(load_mesh(MESH))
    edge_key = next(k for k, step in servicer._steps.items() if step.path == "gateways.edge.routes[1].processing")
    token = access.signer.issue("web-1", "web")

    async def refusal(key: str, token: str | None) -> tuple[grpc.StatusCode | None, str]:
        context = Context(key)
        if token is not None:
            context.metadata += ((TOKEN_HEADER, token),)
        assert [r async for r in servicer.Process(_requests(), context)] == []  # type: ignore[arg-type]
        assert context.aborted is not None
        return context.aborted[0], context.aborted[1].replace(key, "KEY")

    try:
        other = await refusal(edge_key, token)
        unknown = await refusal("gateways.edge.routes[9].processing#000000000000", token)
        assert other[0] == grpc.StatusCode.PERMISSION_DENIED
        assert unknown == other
        assert (await refusal("gateways.edge.routes[9].processing#0", None))[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        servicer.close()


def _spec(name: str) -> Any:
    from xdsd.extproc.phase import StepSpec

    return StepSpec(name, f"{USER}:{name}", {}, identity=False, buffered=False)


async def test_a_broken_worker_pool_is_replaced_once_whatever_the_number_of_calls_in_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from xdsd.extproc import runner as runner_module
    from xdsd.extproc.phase import StreamState

    pools: list[ProcessPoolExecutor] = []

    class Counting(ProcessPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(runner_module, "ProcessPoolExecutor", Counting)
    runner = ProcessRunner(2)
    request = ep.ProcessingRequest(request_headers=_headers(_path="/"))

    async def call(name: str, timeout: float) -> str:
        outcome = await runner.phase(lambda m: None, _spec(name), StreamState(), "request_headers", request, timeout)
        return outcome.kind

    try:
        runner.start()
        await runner.ready()
        # one worker dies while the other sleeps and two calls wait: every one of them sees the breakage
        kinds = await asyncio.wait_for(asyncio.gather(
            call("die", 20), call("sleepy", 20), call("shout", 20), call("shout", 20)), 60)
        assert kinds[0] == "error" and "error" in kinds[1:]
        assert len(pools) == 2  # the first pool and one replacement, not one per call that saw it broken
        await runner.ready()
        assert await call("shout", 20) == "ok"
        assert len(pools) == 2
    finally:
        runner.close()


async def test_a_call_whose_pool_is_shut_down_before_it_runs_is_an_error_not_a_cancellation() -> None:
    from xdsd.extproc.phase import StreamState

    runner = ProcessRunner(1)
    request = ep.ProcessingRequest(request_headers=_headers(_path="/"))
    try:
        runner.start()
        await runner.ready()
        busy = asyncio.create_task(runner.phase(lambda m: None, _spec("sleepy"), StreamState(), "request_headers",
                                                request, 20))
        queued = [asyncio.create_task(runner.phase(lambda m: None, _spec("shout"), StreamState(), "request_headers",
                                                   request, 20)) for _ in range(4)]
        await asyncio.sleep(0.5)
        runner.close()  # cancels the calls still queued
        outcomes = await asyncio.wait_for(asyncio.gather(*queued), 30)
        assert "error" in [o.kind for o in outcomes]
        assert all(o.kind in ("ok", "error") for o in outcomes)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
    finally:
        runner.close()


async def test_a_backtracking_schema_pattern_neither_stalls_the_loop_nor_outlives_its_timeout() -> None:
    """The review's probe: ``^([a-z]+)+$`` against 28 letters and ``!`` takes Python's re about
    2**28 steps with the GIL held (the loop froze, the timeout was not kept). With RE2 the body is
    answered 400 by the processor, and the loop keeps ticking meanwhile."""
    mesh = load_mesh("""
services:
  web: {endpoints: [{address: 127.0.0.2, port: 9080}]}
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - prefix: /
        service: web
        processing:
          processor: json-schema
          phases: [request_headers, request_body]
          timeout: 5s
          args: {schema: {type: object, properties: {name: {type: string, pattern: '^([a-z]+)+$'}}}}
""")
    servicer = ProcessingServicer(ThreadRunner(2))
    servicer.set_mesh(mesh)
    [key] = servicer._steps
    longest_gap = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest_gap
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest_gap, last = max(longest_gap, now - last), now

    ticking = asyncio.create_task(ticker())
    try:
        body = json.dumps({"name": "a" * 28 + "!"}).encode()
        _, answer = await asyncio.wait_for(_run(
            servicer, key, ep.ProcessingRequest(request_headers=_headers(_method="POST", _path="/")),
            ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))), 60)
        assert answer.immediate_response.status.code == 400  # the processor's answer, not a timeout's 504
        assert b"does not match" in answer.immediate_response.body
        assert longest_gap < 3.0, longest_gap  # Python's re held the loop for the whole match (~16 s here)
    finally:
        stop.set()
        await ticking
        servicer.close()


async def test_the_admission_holds_a_slot_until_the_pool_is_done_and_bounds_each_line() -> None:
    from xdsd.extproc.admission import Admission

    admission = Admission(4, per_owner=1, waiting=1, total=3)
    assert await admission.enter("a", 1) == "ok"
    waiter = asyncio.create_task(admission.enter("a", 30))
    await asyncio.sleep(0)
    assert await admission.enter("a", 1) == "overloaded"  # a's line is full
    assert await admission.enter("b", 1) == "ok"  # another owner is not held up by a
    assert await admission.enter("c", 1) == "overloaded"  # three phases in all
    admission.leave("a")  # the pool is done with a's call: its slot goes to the one in line
    assert await asyncio.wait_for(waiter, 10) == "ok"
    assert admission.in_pool("a") == 1
    assert await admission.enter("a", 0.05) == "timeout"  # waited in line, no slot came
    admission.leave("a")
    admission.leave("b")
    assert admission.in_pool("a") == admission.in_pool("b") == 0 and admission._count == 0


async def test_one_owners_heavy_bodies_do_not_starve_another_owners_steps() -> None:
    from xdsd.extproc.admission import Admission

    mesh = load_mesh(f"""
services:
  web:
    endpoints: [{{address: 127.0.0.2, port: 15006}}]
    sidecar: {{inbound: {{address: 127.0.0.2, port: 15006}}, app_port: 9080}}
    processing: {{processor: "{USER}:shout", timeout: 20s}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes:
      - {{prefix: /open, service: web, processing: {{processor: "{USER}:slow", timeout: 20s, failure: open}}}}
      - {{prefix: /, service: web, processing: {{processor: "{USER}:slow", timeout: 20s}}}}
""")
    seen: list[tuple[str, str, str, float]] = []
    servicer = ProcessingServicer(ThreadRunner(2), observer=lambda *a: seen.append(a),
                                  admission=Admission(2, per_owner=1, waiting=1))
    servicer.set_mesh(mesh)
    keys = {step.path: key for key, step in servicer._steps.items()}
    closed, opened = keys["gateways.edge.routes[1].processing"], keys["gateways.edge.routes[0].processing"]
    request = ep.ProcessingRequest(request_headers=_headers(_path="/", x_word="hi"))
    finished: list[str] = []

    async def run(name: str, key: str) -> ep.ProcessingResponse:
        [answer] = await _run(servicer, key, request)
        finished.append(name)
        return answer

    try:
        first = asyncio.create_task(run("first", closed))  # in the pool (2 s of Python)
        await asyncio.sleep(0.05)
        second = asyncio.create_task(run("second", closed))  # in edge's line
        await asyncio.sleep(0.05)
        third = await asyncio.wait_for(run("third", closed), 10)  # line full: refused at once
        fourth = await asyncio.wait_for(run("fourth", opened), 10)
        web = await asyncio.wait_for(run("web", keys["services.web.processing"]), 15)
        assert third.immediate_response.status.code == 503
        assert [h.header.raw_value for h in third.immediate_response.headers.set_headers
                if h.header.key == PROCESSING_METADATA] == [b"overloaded"]
        assert fourth.WhichOneof("response") == "request_headers"  # failure: open lets it pass
        [shouted] = [h for h in web.request_headers.response.header_mutation.set_headers if h.header.key == "x-shouted"]
        assert shouted.header.raw_value == b"HI"
        await asyncio.wait_for(asyncio.gather(first, second), 60)
        assert finished.index("web") < finished.index("first")  # not queued behind edge's busy worker
        overloaded = [o for _, _, o, _ in seen if o == "overloaded"]
        assert len(overloaded) == 2
    finally:
        servicer.close()


def test_routes_with_a_response_redaction_ask_the_app_for_uncompressed_bodies() -> None:
    """json-redact refuses compressed bodies (502): its routes drop the client's accept-encoding."""
    mesh = load_mesh(MESH.replace(f'processing: {{processor: "{USER}:caller"}}',
                                  "processing: {processor: json-redact, phases: [response_headers, response_body], "
                                  "args: {mask: [a]}}"))
    [rc] = generate(mesh, NodeGroup("edge"))[typeurls.ROUTE]
    removed = [list(r.request_headers_to_remove) for r in rc.virtual_hosts[0].routes]
    assert removed == [[], [], [], ["accept-encoding"], []]  # only /redact's route
    listener = next(m for m in generate(mesh, NodeGroup("web"))[typeurls.LISTENER] if m.name == "inbound|15006")
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert list(hcm.route_config.virtual_hosts[0].routes[0].request_headers_to_remove) == ["accept-encoding"]


async def test_by_default_one_owner_never_holds_every_worker() -> None:
    """Two threads; edge sends two phases of 2 s of Python: with the default admission (half the
    workers per owner) the second waits in edge's line and web's phase takes the free worker."""
    mesh = load_mesh(f"""
services:
  web:
    endpoints: [{{address: 127.0.0.2, port: 15006}}]
    sidecar: {{inbound: {{address: 127.0.0.2, port: 15006}}, app_port: 9080}}
    processing: {{processor: "{USER}:shout", timeout: 30s}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes: [{{prefix: /, service: web, processing: {{processor: "{USER}:slow", timeout: 30s}}}}]
""")
    servicer = ProcessingServicer(ThreadRunner(2))
    servicer.set_mesh(mesh)
    keys = {step.path: key for key, step in servicer._steps.items()}
    request = ep.ProcessingRequest(request_headers=_headers(_path="/", x_word="hi"))
    finished: list[str] = []

    async def run(name: str, key: str) -> None:
        await _run(servicer, key, request)
        finished.append(name)

    try:
        slow = [asyncio.create_task(run(f"slow{i}", keys["gateways.edge.routes[0].processing"])) for i in range(2)]
        await asyncio.sleep(0.1)
        await asyncio.wait_for(run("web", keys["services.web.processing"]), 30)
        await asyncio.wait_for(asyncio.gather(*slow), 60)
        assert finished[0] == "web", finished  # without the admission: queued behind both slow phases
    finally:
        servicer.close()
