"""The registration API on real sockets (aiohttp on the admin side; gRPC over xdsd's own h2
transport and over grpcio's server): who may call it (Access), what it answers, and that nothing a
client sends gets a 5xx or leaves the registry unable to serve (property tests)."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from aiohttp import web
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsd.api.v1 import registration_pb2, registration_pb2_grpc
from xdsd.auth.access import Access
from xdsd.auth.tokens import TokenSigner
from xdsd.generators.endpoints import load_assignment
from xdsd.model import Mesh, load_mesh
from xdsd.registry.api import RegistrationServicer, http_routes
from xdsd.registry.instance import default_instance_id, instance_json, instance_pb
from xdsd.registry.merge import merge, mesh_check
from xdsd.registry.registry import Registry
from xdsd.registry.store import MemoryStore
from xdsd.transport.server import GrpcServer

T = TypeVar("T")
SIDECAR = {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080}}
MESH: Mesh = load_mesh(yaml.safe_dump({"services": {"reviews": SIDECAR, "details": SIDECAR, "web": {}}}))
SIGNER = TokenSigner(b"k" * 32)


@functools.cache
def token(service: str, node: str = "n1") -> str:
    """One token per (service, node): the per-token quota sees the same token id again."""
    return SIGNER.issue(node, service)


class Server:
    """The registration API of one Registry, served by an event loop in a thread: HTTP (aiohttp on
    127.0.0.1:0) and gRPC (``transport``: "h2", xdsd's default, or "grpcio")."""

    def __init__(self, access: Access, transport: str = "h2", **limits: int) -> None:
        self.access = access
        self.transport = transport
        self.limits = limits
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.registry: Registry
        self.http_port = self.grpc_port = 0

    def start(self) -> Server:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.registry = Registry(MemoryStore(), **self.limits)
        self.registry.mesh_check = mesh_check(lambda: MESH)
        app = web.Application()
        app.add_routes(http_routes(self.registry, self.access))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = self.runner.addresses[0][1]
        servicer = RegistrationServicer(self.registry, self.access)
        if self.transport == "h2":
            self.grpc: Any = GrpcServer()
            registration_pb2_grpc.add_RegistrationServicer_to_server(servicer, self.grpc)
            self.grpc_port = await self.grpc.listen("127.0.0.1", 0)
        else:
            self.grpc = grpc.aio.server()
            registration_pb2_grpc.add_RegistrationServicer_to_server(servicer, self.grpc)
            self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        await self.grpc.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())  # type: ignore[no-any-return]

    def stop(self) -> None:
        async def stop() -> None:
            await self.grpc.stop(None)
            await self.runner.cleanup()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    # -- clients --------------------------------------------------------------------------

    def http(self, path: str, body: bytes | dict[str, Any] | None = None, tok: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method="POST" if data is not None else "GET")
        req.add_header("content-type", "application/json")
        if tok is not None:
            req.add_header("x-xdsd-token", tok)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if exc.headers.get_content_type() == "application/json" else raw

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    # -- what must always hold ------------------------------------------------------------

    def assert_serving(self) -> None:
        """/v1/instances answers 200 to any valid token, and every stored instance encodes to
        JSON and to the Envoy endpoints it is served as."""
        status, listed = self.http("/v1/instances", tok=SIGNER.operator())
        assert status == 200, listed
        instances = self.on_loop(self.registry.list)
        assert len(listed["instances"]) == len(instances)
        for inst in instances:
            json.dumps(inst.as_json()).encode("utf-8")
            json.dumps(instance_json(inst), ensure_ascii=False).encode("utf-8")
            instance_pb(inst).SerializeToString()
        merged = merge(MESH, instances)
        for name in merged.services:
            load_assignment(name, merged.endpoints_of(name), "zone-a").SerializeToString()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(Access(SIGNER)).start()
    yield s
    s.stop()


@pytest.fixture(params=["h2", "grpcio"])
def grpc_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(Access(SIGNER), request.param).start()
    yield s
    s.stop()


def vm(address: str = "10.0.0.7", service: str = "reviews", **extra: Any) -> dict[str, Any]:
    return {"service": service, "address": address, "port": 15006, **extra}


# -- authentication (HTTP) --------------------------------------------------------------------


def test_registering_needs_a_node_token_of_that_service(server: Server) -> None:
    status, body = server.http("/v1/register", vm())
    assert status == 401 and body["errors"][0].startswith("missing-token:")
    assert server.http("/v1/register", vm(), "v2.garbage.mac")[0] == 401
    status, body = server.http("/v1/register", vm(), token("details"))
    assert status == 403 and body["errors"][0].startswith("wrong-cluster:")
    assert server.http("/v1/register", vm(), SIGNER.operator())[0] == 403
    assert server.http("/v1/instances", tok=token("reviews"))[1] == {"instances": []}
    status, body = server.http("/v1/register", vm(), token("reviews"))
    assert status == 200 and body["instance_id"] == "10.0.0.7:15006"
    server.assert_serving()


def test_a_non_ascii_or_otherwise_strange_token_is_401(server: Server) -> None:
    status, body = server.http("/v1/register", b'{"service":"reviews"}',
                               headers={"x-xdsd-token": "v1.e30.\xc3\xa9"})  # latin-1 on the wire: é bytes
    assert status == 401, body
    assert server.http("/v1/register", vm(), headers={"authorization": "Bearer v2.\u00e9.x"})[0] == 401
    assert server.http("/v1/register", vm(), "x" * 5000)[0] in (400, 401, 431)
    assert server.http("/v1/instances", headers={"x-xdsd-token": "\x7f"})[0] in (400, 401)  # aiohttp: 400


def test_heartbeat_and_deregister_need_a_token_of_the_instances_service(server: Server) -> None:
    assert server.http("/v1/register", vm(), token("reviews"))[0] == 200
    ids = {"service": "reviews", "instance_id": "10.0.0.7:15006"}
    assert server.http("/v1/heartbeat", ids, token("details"))[0] == 403
    assert server.http("/v1/heartbeat", ids)[0] == 401
    assert server.http("/v1/heartbeat", ids, token("reviews", node="another-node"))[0] == 200
    assert server.http("/v1/deregister", ids, token("details"))[0] == 403
    status, body = server.http("/v1/deregister", ids, token("reviews"))
    assert status == 200 and body["state"] == "DRAINING"
    assert server.http("/v1/heartbeat", {**ids, "instance_id": "ghost"}, token("reviews"))[0] == 404
    status, body = server.http("/v1/heartbeat", {**ids, "extra": 1, "instance_id": "a b"}, token("reviews"))
    assert status == 400 and {e.split(":")[0] for e in body["errors"]} == {"extra", "instance_id"}
    status, body = server.http("/v1/heartbeat", {**ids, "instance_id": "\ud800"}, token("reviews"))
    assert status == 400 and body["errors"] == ["instance_id: not valid Unicode (a lone surrogate)"]


def test_listing_needs_any_valid_token(server: Server) -> None:
    assert server.http("/v1/instances")[0] == 401
    assert server.http("/v1/instances", tok="nope")[0] == 401
    assert server.http("/v1/instances", tok=SIGNER.operator())[0] == 200
    assert server.http("/v1/instances?service=details", tok=token("reviews"))[0] == 200
    status, body = server.http("/v1/instances?service=%ED%A0%80", tok=token("reviews"))
    assert status == 400 and body["errors"][0].startswith("service:")
    assert server.http("/v1/instances?service=Bad%0A", tok=token("reviews"))[0] == 400


def test_with_authentication_off_everyone_may() -> None:
    s = Server(Access.off()).start()
    try:
        assert s.http("/v1/register", vm())[0] == 200
        assert s.http("/v1/register", vm("10.0.0.8"), "any garbage")[0] == 200
        assert len(s.http("/v1/instances")[1]["instances"]) == 2
    finally:
        s.stop()


# -- findings 1 and 2 over HTTP ---------------------------------------------------------------

POISON = [
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"zone":"\\ud800"}',
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"labels":{"v":"\\udc80"}}',
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"labels":{"\\ud800":"v"}}',
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"instance_id":"\\udbff"}',
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"ttl":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"10.0.0.9","port":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"10.0.0.9","port":15006,"weight":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"127.0.0.1\\n","port":15006}',
    b"[" * 1000 + b"]" * 1000,
    b'{"service":"reviews","labels":' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
    b"[" * 100_000 + b"]" * 100_000,
    b"\xff\xfe",
    b"",
]


def test_poison_bodies_get_4xx_and_the_registry_keeps_serving(server: Server) -> None:
    tok = token("reviews")
    for raw in POISON:
        status, body = server.http("/v1/register", raw, tok)
        assert status in (400, 413), (raw[:80], status, body)
        assert body["errors"], body
    assert server.http("/v1/register", vm("::1"), tok)[1]["instance_id"] == "[::1]:15006"
    server.assert_serving()
    assert [i.instance_id for i in server.on_loop(server.registry.list)] == ["[::1]:15006"]


def test_squatting_another_services_address_does_not_block_it(server: Server) -> None:
    status, _ = server.http("/v1/register", vm(service="details", instance_id="squat"), token("details"))
    assert status == 200
    status, body = server.http("/v1/register", vm(instance_id="vm7"), token("reviews"))
    assert status == 200, body
    status, body = server.http("/v1/register", vm(instance_id="vm8"), token("reviews"))
    assert status == 400 and body["errors"][0].startswith("address: 10.0.0.7:15006 is already registered as reviews/vm7")


def test_quotas_answer_429_naming_the_limit() -> None:
    s = Server(Access(SIGNER), max_per_service=3, max_per_token=2).start()
    try:
        t1, t2 = token("web", "a"), token("web", "b")
        for i in range(2):
            assert s.http("/v1/register", {"service": "web", "address": "10.0.0.1", "port": 100 + i}, t1)[0] == 200
        status, body = s.http("/v1/register", {"service": "web", "address": "10.0.0.1", "port": 102}, t1)
        assert status == 429 and body["errors"][0].startswith("token:") and "limit per token" in body["errors"][0]
        assert s.http("/v1/register", {"service": "web", "address": "10.0.0.1", "port": 102}, t2)[0] == 200
        status, body = s.http("/v1/register", {"service": "web", "address": "10.0.0.1", "port": 103}, t2)
        assert status == 429 and body["errors"][0].startswith("service:") and "per service" in body["errors"][0]
    finally:
        s.stop()


def test_a_body_over_64_kib_is_413_even_when_chunked(server: Server) -> None:
    big = b'{"zone":"' + b"z" * (64 * 1024) + b'"}'
    assert server.http("/v1/register", big, token("reviews"))[0] == 413

    def chunks() -> Iterator[bytes]:
        yield from (big[i:i + 4096] for i in range(0, len(big), 4096))

    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/register", data=chunks(), method="POST",
                                 headers={"x-xdsd-token": token("reviews"), "transfer-encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 413


@pytest.mark.parametrize("raw", [
    b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":1}",
    b"POST /v1/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
], ids=["content-length", "chunked"])
def test_a_client_hanging_up_mid_body_is_no_bug(server: Server, raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    raw = raw.replace(b"Host: x\r\n", b"Host: x\r\nx-xdsd-token: " + token("reviews").encode() + b"\r\n")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(raw)
        time.sleep(0.1)  # the handler is waiting for the rest
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not caplog.records:
        time.sleep(0.02)
    server.assert_serving()
    assert not [r.getMessage() for r in caplog.records if r.name == "xdsd.registry.api"]


def test_an_unexpected_exception_is_a_logged_500_not_a_crash(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    server.registry.register = broken  # type: ignore[method-assign]
    status, body = server.http("/v1/register", vm(), token("reviews"))
    assert status == 500 and body == {"errors": ["internal error"]}
    assert any("registration API (HTTP) failed" in r.getMessage() for r in caplog.records)


# -- gRPC -------------------------------------------------------------------------------------


def md(tok: str | None) -> tuple[tuple[str, str], ...]:
    return () if tok is None else (("x-xdsd-token", tok),)


def rpc_code(fn: Callable[..., Any], request: Any, tok: str | None) -> grpc.StatusCode:
    try:
        fn(request, metadata=md(tok), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_grpc_codes(grpc_server: Server) -> None:
    with grpc_server.channel() as channel:
        stub = registration_pb2_grpc.RegistrationStub(channel)
        req = registration_pb2.RegisterRequest(service="reviews", address="::1", port=15006)
        assert rpc_code(stub.Register, req, None) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Register, req, "v1.e30.AA") == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Register, req, token("details")) == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_code(stub.List, registration_pb2.ListRequest(), None) == grpc.StatusCode.UNAUTHENTICATED
        inst = stub.Register(req, metadata=md(token("reviews")), timeout=10)
        assert inst.instance_id == "[::1]:15006" and inst.state == registration_pb2.Instance.ACTIVE
        bad = registration_pb2.RegisterRequest(service="reviews", address="10.0.0.1", port=0, zone="a\nb",
                                               labels={"k\n": "v"})
        bad.ttl.seconds = 2**62  # ToTimedelta() would overflow
        with pytest.raises(grpc.RpcError) as exc:
            stub.Register(bad, metadata=md(token("reviews")), timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = exc.value.details() or ""
        assert all(f in details for f in ("port:", "zone:", "labels[", "ttl:")), details
        hb = registration_pb2.HeartbeatRequest(service="reviews", instance_id="ghost")
        assert rpc_code(stub.Heartbeat, hb, token("reviews")) == grpc.StatusCode.NOT_FOUND
        hb = registration_pb2.HeartbeatRequest(service="reviews", instance_id="[::1]:15006")
        assert rpc_code(stub.Heartbeat, hb, token("details")) == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_code(stub.Heartbeat, hb, token("reviews")) == grpc.StatusCode.OK
        listed = stub.List(registration_pb2.ListRequest(service="reviews"), metadata=md(SIGNER.operator()), timeout=10)
        assert [i.instance_id for i in listed.instances] == ["[::1]:15006"]
        dereg = registration_pb2.DeregisterRequest(service="reviews", instance_id="[::1]:15006")
        assert stub.Deregister(dereg, metadata=md(token("reviews")), timeout=10).state == registration_pb2.Instance.DRAINING
    grpc_server.assert_serving()


class FakeContext:
    """Enough of a ServicerContext to call the servicer directly (gRPC clients refuse to send
    non-ASCII metadata; another client, or a proxy, might)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError(code.name)


@pytest.mark.parametrize("tok", ["v1.e30.\u00e9", "v2.\udcc3\udca9.x", "\x00", "v2." + "é" * 3000])
async def test_grpc_a_non_ascii_token_is_unauthenticated(tok: str) -> None:
    servicer = RegistrationServicer(Registry(MemoryStore()), Access(SIGNER))
    for call, request in [(servicer.Register, registration_pb2.RegisterRequest(service="reviews")),
                          (servicer.List, registration_pb2.ListRequest())]:
        context = FakeContext((("x-xdsd-token", tok),))
        with pytest.raises(grpc.aio.AbortError):
            await call(request, context)  # type: ignore[arg-type]
        assert context.code == grpc.StatusCode.UNAUTHENTICATED, context.details


def test_grpc_quota_is_resource_exhausted() -> None:
    s = Server(Access(SIGNER), "h2", max_per_service=1).start()
    try:
        with s.channel() as channel:
            stub = registration_pb2_grpc.RegistrationStub(channel)
            ok = registration_pb2.RegisterRequest(service="web", address="10.0.0.1", port=1)
            assert rpc_code(stub.Register, ok, token("web")) == grpc.StatusCode.OK
            more = registration_pb2.RegisterRequest(service="web", address="10.0.0.1", port=2)
            assert rpc_code(stub.Register, more, token("web")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        s.stop()


# -- properties: nothing a client sends gets a 5xx or breaks serving ---------------------------

FIELDS = ["service", "instance_id", "address", "port", "weight", "zone", "labels", "ttl"]
# Strings near the rules' edges: valid values, their neighbours, and what once did harm.
EDGY = st.sampled_from([
    "reviews", "web", "details", "nope", "", "10.0.0.1", "::1", "127.0.0.1\n", "fe80::1%eth0", "vm7.internal",
    "10s", "0s", "1e999s", "24h", "25h", "zone-a", "a" * 300, "[::1]:15006", "\x00", "\u2028", "\x85", "é",
])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), EDGY,
)
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                       max_leaves=8)
ANY_VALUE = st.one_of(SCALARS, JSONISH, st.dictionaries(st.text(max_size=10) | EDGY, st.text(max_size=10) | EDGY, max_size=4))
ADDRESSES = (st.builds("10.0.{}.{}".format, st.integers(0, 3), st.integers(0, 255))
             | st.builds("2001:db8::{:x}".format, st.integers(0, 65535)) | st.builds("vm{}.internal".format, st.integers(0, 999)))
# Values of the right type for each field, mostly valid (with any printable Unicode in zones and
# label values), sometimes anything of that type.
PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
PLAUSIBLE = {
    "instance_id": st.from_regex(r"[a-z][a-z0-9._:\[\]-]{0,10}", fullmatch=True) | st.text(max_size=8),
    "address": ADDRESSES | st.sampled_from(["0::1", "VM1.internal.", "2001:DB8:0::1"]) | st.text(max_size=12),
    "port": st.sampled_from([15006, 80]) | st.integers(-5, 70_000),
    "weight": st.integers(1, 10) | st.integers(),
    "zone": PRINTABLE | PRINTABLE | st.text(max_size=12) | EDGY,
    "labels": st.dictionaries(st.from_regex(r"[a-z][a-z0-9./_-]{0,5}", fullmatch=True), PRINTABLE, max_size=3)
    | st.dictionaries(st.text(max_size=4), st.text(max_size=8) | EDGY, max_size=3),
    "ttl": st.integers(1, 100) | st.sampled_from(["10s", "1h", "500ms", "86400s", "86401s"]) | st.floats(0, 1e6),
}
VALID = st.fixed_dictionaries({"service": st.sampled_from(["web", "reviews"]), "address": ADDRESSES,
                               "port": st.just(15006)})
# Valid registrations with some fields set to plausible values and maybe one to anything: most of
# what gets stored comes from here.
MUTATED = st.builds(lambda base, plausible, wild: {**base, **plausible, **wild}, VALID,
                    st.fixed_dictionaries({}, optional=PLAUSIBLE),
                    st.just({}) | st.dictionaries(st.sampled_from([*FIELDS, "colour"]), ANY_VALUE, min_size=1, max_size=1))
BODIES = MUTATED | st.dictionaries(st.sampled_from([*FIELDS, "colour"]), ANY_VALUE, max_size=9)
# Whose token: the body's own service, another service's, an operator's, none.
WHO = st.sampled_from(["own", "own", "own", "details", "operator", None])


def token_for(who: str | None, service: object) -> str | None:
    if who is None:
        return None
    if who == "operator":
        return SIGNER.operator()
    return token(service if who == "own" and isinstance(service, str) else str(who if who != "own" else "web"))


MANGLE = st.sampled_from(["", "", "", "", "surrogate", "deep"])
ESCAPES = st.sampled_from(["\\ud800", "\\udc80", "\\udbff\\udbff", "\\ud83d\\ude00"])  # the last: a valid pair
DEPTHS = st.sampled_from([10, 40, 1000, 30_000])


def as_text(body: dict[str, Any], mangle: str, at: int, escape: str, depth: int) -> str:
    """JSON text of ``body``; with ``mangle``, a surrogate escape spliced in after a quote (into a
    key or a string), or deep nesting added."""
    text = json.dumps(body)
    quotes = [i for i, c in enumerate(text) if c == '"']
    if mangle == "surrogate" and quotes:
        q = quotes[at % len(quotes)]
        text = text[: q + 1] + escape + text[q + 1:]
    elif mangle == "deep":
        text = text[:-1] + (", " if body else "") + '"labels": ' + '{"a":' * depth + "1" + "}" * depth + "}"
    return text


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[Server]:
    s = Server(Access(SIGNER), max_per_service=30, max_per_token=20).start()
    yield s
    s.stop()


@PROPERTY
@given(body=BODIES, who=WHO, mangle=MANGLE, at=st.integers(0, 1000), escape=ESCAPES, depth=DEPTHS, drop=st.booleans())
def test_http_any_body_is_2xx_or_4xx_and_serving_survives(shared: Server, body: dict[str, Any], who: str | None,
                                                          mangle: str, at: int, escape: str, depth: int,
                                                          drop: bool) -> None:
    tok = token_for(who, body.get("service"))
    status, reply = shared.http("/v1/register", as_text(body, mangle, at, escape, depth).encode(), tok)
    assert 200 <= status < 300 or 400 <= status < 500, (body, status, reply)
    ids = {k: (reply if status == 200 else body).get(k) for k in ("service", "instance_id")}
    for path in ("/v1/heartbeat", "/v1/deregister" if drop else "/v1/heartbeat"):
        status, reply = shared.http(path, as_text(ids, mangle, at, escape, depth).encode(), tok)
        assert 200 <= status < 300 or 400 <= status < 500, (path, ids, status, reply)
    shared.assert_serving()


TEXT = st.text(max_size=30) | EDGY
DURATIONS = st.builds(duration_pb2.Duration, seconds=st.integers(0, 100_000) | st.integers(-(2**63), 2**63 - 1),
                      nanos=st.just(0) | st.integers(-(2**31), 2**31 - 1))
VALID_REQUESTS = st.builds(
    registration_pb2.RegisterRequest,
    service=st.sampled_from(["reviews", "web"]), address=ADDRESSES, port=st.just(15006),
    instance_id=st.just("") | PLAUSIBLE["instance_id"], zone=st.just("") | PRINTABLE,
    labels=st.dictionaries(st.from_regex(r"[a-z][a-z0-9./_-]{0,5}", fullmatch=True), PRINTABLE, max_size=3),
    weight=st.integers(0, 10), ttl=st.none() | st.builds(duration_pb2.Duration, seconds=st.integers(1, 1000)),
)
# Any value a protobuf field can hold, for a few fields of a valid request.
WILD = st.fixed_dictionaries({}, optional={
    "service": TEXT, "instance_id": TEXT, "address": TEXT, "port": st.integers(0, 2**32 - 1),
    "weight": st.integers(0, 2**32 - 1), "zone": TEXT, "labels": st.dictionaries(TEXT, TEXT, max_size=4), "ttl": DURATIONS,
})


def with_fields(base: registration_pb2.RegisterRequest, wild: dict[str, Any]) -> registration_pb2.RegisterRequest:
    req = registration_pb2.RegisterRequest()
    req.CopyFrom(base)
    for name, value in wild.items():
        if name == "labels":
            req.labels.clear()
            req.labels.update(value)
        elif name == "ttl":
            req.ttl.CopyFrom(value)
        else:
            setattr(req, name, value)
    return req


REQUESTS = st.builds(with_fields, VALID_REQUESTS, st.just({}) | WILD)
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module", params=["h2", "grpcio"])
def shared_grpc(request: pytest.FixtureRequest) -> Iterator[tuple[Server, grpc.Channel]]:
    s = Server(Access(SIGNER), request.param, max_per_service=30, max_per_token=20).start()
    channel = s.channel()
    yield s, channel
    channel.close()
    s.stop()


@PROPERTY
@given(req=REQUESTS, who=WHO, drop=st.booleans())
def test_grpc_any_request_gets_a_client_status_and_serving_survives(shared_grpc: tuple[Server, grpc.Channel],
                                                                    req: registration_pb2.RegisterRequest,
                                                                    who: str | None, drop: bool) -> None:
    s, channel = shared_grpc
    stub = registration_pb2_grpc.RegistrationStub(channel)
    tok = token_for(who, req.service)
    code = rpc_code(stub.Register, req, tok)
    assert code in GRPC_OK, (req, code)
    ids = {"service": req.service, "instance_id": req.instance_id or default_instance_id(req.address, req.port)}
    second = (stub.Deregister, registration_pb2.DeregisterRequest(**ids)) if drop else \
        (stub.Heartbeat, registration_pb2.HeartbeatRequest(**ids))
    for fn, request in [(stub.Heartbeat, registration_pb2.HeartbeatRequest(**ids)), second,
                        (stub.List, registration_pb2.ListRequest(service=req.service))]:
        code = rpc_code(fn, request, tok)
        assert code in GRPC_OK, (fn, request, code)
    s.assert_serving()
