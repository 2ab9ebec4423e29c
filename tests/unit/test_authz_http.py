"""The HTTP/1.1 ext_authz server on a real socket: decisions, framing (pipelining, split reads,
bodies), and malformed or oversized input answered with a denial instead of a crash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support.authz_http import MESH, PP, check, read_response
from xdsd.authz.http import (
    MAX_HEAD,
    AuthzHttpProtocol,
    AuthzHttpServer,
    principal_from_xfcc,
    start_http_authz,
)
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.generators.listeners import ext_authz_filter, policy_headers
from xdsd.generators.node import NodeGroup
from xdsd.model import load_mesh

_servers: list[AuthzHttpServer] = []  # the fixture's server, for tests that look inside
@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[int, list[tuple[str, str, str]]]]:
    seen: list[tuple[str, str, str]] = []
    authz = AuthorizationServicer(lambda service, rule, outcome, _: seen.append((service, rule, outcome)))
    authz.set_mesh(load_mesh(MESH))
    srv = await start_http_authz(authz, "127.0.0.1", 0)
    _servers.append(srv)
    yield srv.port, seen
    await srv.close()


async def test_decisions(server: tuple[int, list[tuple[str, str, str]]]) -> None:
    port, seen = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(check("reviews/reviews/1"))
    assert (await read_response(reader))[0] == 200
    writer.write(check("reviews/admin"))
    status, headers, body = await read_response(reader)
    assert status == 403 and headers["x-xdsd-authz"] == "deny; rule=no-admin" and b"rule no-admin" in body
    writer.write(check("reviews/reviews/1", method="POST"))
    assert (await read_response(reader))[0] == 403
    # No caller identity and no rule for the anonymous: unauthenticated (401), not forbidden.
    writer.write(check("reviews/other", xfcc=None))
    assert (await read_response(reader))[0] == 401
    # Header names are case-insensitive; values exact.
    writer.write(check("reviews/x", xfcc=None, extra="X-TENANT: a\r\n"))
    assert (await read_response(reader))[0] == 200
    # The dry-run rule is reported, the request allowed by pp-read.
    writer.write(check("reviews/reviews/probe"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["x-xdsd-authz-dry-run"] == "probe=deny"
    # A service without a policy: everything is allowed.
    writer.write(check("nopolicy/anything", xfcc=None))
    assert (await read_response(reader))[0] == 200
    # `OPTIONS *`: the path has no slash; the service still ends at the prefix's slash.
    writer.write(b"OPTIONS /_xdsd/authz/reviews/* HTTP/1.1\r\nx-forwarded-client-cert: " + PP.encode() + b"\r\n\r\n")
    assert (await read_response(reader))[0] == 403
    writer.write(b"OPTIONS /_xdsd/authz/reviews* HTTP/1.1\r\n\r\n")  # no slash after the service: no service
    assert (await read_response(reader))[0] == 403
    writer.write(check("reviews/reviews/1", method="HEAD"))
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == 200
    writer.close()
    assert ("reviews", "no-admin", "deny") in seen and ("reviews", "probe", "dry-run-deny") in seen


async def test_pipelined_split_and_with_bodies(server: tuple[int, list[tuple[str, str, str]]]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body_req = b"GET /_xdsd/authz/reviews//reviews/2 HTTP/1.1\r\ncontent-length: 5\r\nx-forwarded-client-cert: " + \
        PP.encode() + b"\r\n\r\nhello"
    stream = check("reviews/reviews/1") + body_req + check("reviews/admin")
    for i in range(len(stream)):  # one byte at a time: every split point
        writer.write(stream[i:i + 1])
        if i % 17 == 0:
            await writer.drain()
            await asyncio.sleep(0)
    assert [(await read_response(reader))[0] for _ in range(3)] == [200, 200, 403]
    writer.close()


async def test_bad_input_is_denied_and_the_connection_closed(server: tuple[int, list[tuple[str, str, str]]]) -> None:
    port, _ = server
    for raw, want in [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /_xdsd/authz/reviews/x HTTP/1.1\r\nbad header line\r\n\r\n", 400),
        (b"GET /_xdsd/authz/reviews/x HTTP/1.1\r\ncontent-length: -3\r\n\r\n", 400),
        (b"GET /_xdsd/authz/reviews/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
        (b"GET /elsewhere HTTP/1.1\r\n\r\n", 403),
        (b"GET /_xdsd/authz/reviews/x HTTP/1.1\r\nx: " + b"a" * (MAX_HEAD + 10), 431),
        (b"GET /_xdsd/authz/reviews/\xff\xfe HTTP/1.1\r\nx-odd: \xc3\x28\x80\r\n\r\n", 401),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        status, _, _ = await read_response(reader)
        assert status == want, raw[:40]
        if want in (400, 431):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the denial
        writer.close()
    # The server still answers.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(check("reviews/reviews/1", extra="connection: close\r\n"))
    assert (await read_response(reader))[0] == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_principal_from_xfcc() -> None:
    assert principal_from_xfcc(PP) == "spiffe://td/service/productpage"
    assert principal_from_xfcc('By=spiffe://a;URI="spiffe://td/service/x"') == "spiffe://td/service/x"
    assert principal_from_xfcc("URI=spiffe://first,By=b;URI=spiffe://last") == "spiffe://last"
    assert principal_from_xfcc("By=spiffe://a;Hash=h") == ""
    assert principal_from_xfcc("") == ""


def test_the_filter_asks_over_http_only_when_the_bootstrap_has_the_cluster() -> None:
    mesh = load_mesh(MESH)
    assert policy_headers(mesh.authorization["reviews"]) == ("x-tenant",)
    assert policy_headers(None) == ()
    grpc_filter = ext_authz_filter(NodeGroup(cluster="reviews"), "reviews")
    http_filter = ext_authz_filter(NodeGroup(cluster="reviews", authz_cluster="xdsd_authz"), "reviews", ("x-tenant",))
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

    g, h = ext_authz_pb2.ExtAuthz(), ext_authz_pb2.ExtAuthz()
    grpc_filter.typed_config.Unpack(g)
    http_filter.typed_config.Unpack(h)
    assert g.WhichOneof("services") == "grpc_service" and g.grpc_service.envoy_grpc.cluster_name == "xds_cluster"
    assert not g.failure_mode_allow and g.status_on_error.code == 403
    assert h.WhichOneof("services") == "http_service" and not h.failure_mode_allow
    assert h.http_service.server_uri.cluster == "xdsd_authz"
    assert h.http_service.path_prefix == "/_xdsd/authz/reviews/"
    assert [p.exact for p in h.allowed_headers.patterns] == ["x-forwarded-client-cert", "traceparent", "tracestate",
                                                             "x-tenant"]
    assert [p.exact for p in h.disallowed_headers.patterns] == ["authorization"]
    assert [p.exact for p in h.http_service.authorization_response.allowed_client_headers_on_success.patterns] == [
        "x-xdsd-authz-dry-run"]


class _SlowPeerTransport(asyncio.Transport):
    """A transport whose peer reads nothing until told: it asks the protocol to pause writing past
    ``high`` buffered bytes, as asyncio's transports do."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high, self.buffered, self.answers, self.reading, self.paused = high, 0, 0, True, False
        self.protocol: AuthzHttpProtocol | None = None

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.buffered += len(data)
        self.answers += data.count(b"HTTP/1.1 ")
        if self.buffered > self.high and not self.paused:
            self.paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        self.paused = False
        assert self.protocol is not None
        self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered


def test_a_peer_that_never_reads_cannot_pile_up_answers() -> None:
    """Pipelined checks from a peer that does not read the answers: past the transport's high-water
    mark xdsd stops answering and stops reading (asyncio flow control) instead of buffering answers
    without bound; once the peer reads, the rest is answered and nothing is lost."""
    authz = AuthorizationServicer()
    authz.set_mesh(load_mesh(MESH))
    transport = _SlowPeerTransport(high=4096)
    proto = AuthzHttpProtocol(authz, set())
    transport.protocol = proto
    proto.connection_made(transport)
    n = 2000
    proto.data_received(check("reviews/reviews/1") * n)  # one read holding 2,000 checks
    assert not transport.reading and transport.buffered < 4096 + 200 and transport.answers < 200
    rounds = 0
    while transport.answers < n:
        transport.drain()
        rounds += 1
        assert transport.buffered < 4096 + 200 and rounds < n
    assert transport.answers == n and transport.reading is (not transport.paused)


async def test_slow_heads_idle_connections_and_too_many_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import xdsd.authz.http as http_mod

    monkeypatch.setattr(http_mod, "SWEEP_INTERVAL", 0.05)
    monkeypatch.setattr(http_mod, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(http_mod, "IDLE_TIMEOUT", 2.0)
    monkeypatch.setattr(http_mod, "MAX_CONNECTIONS", 3)
    authz = AuthorizationServicer()
    authz.set_mesh(load_mesh(MESH))
    srv = await start_http_authz(authz, "127.0.0.1", 0)
    try:
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", srv.port)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", srv.port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", srv.port)
        for w, r in ((idle_w, idle_r), (busy_w, busy_r)):
            w.write(check("reviews/reviews/1"))
            assert (await read_response(r))[0] == 200
        # A head trickled byte by byte (a byte every 10 ms: never idle) would take 20 s to complete:
        # the connection is closed long before that, at HEAD_TIMEOUT, despite the activity.
        head = b"GET /_xdsd/authz/reviews//x HTTP/1.1\r\nx-a: " + b"b" * 2000
        sent = 0
        for byte in head:
            if slow_r.at_eof():
                break
            slow_w.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(slow_r.read(), 5) == b""
        assert sent < len(head), "the slow head was never cut off"
        # Full of connections that checked just now: one more is refused at once (a connection that
        # sent nothing yet, or idle for ACTIVE_SECONDS, would have been shed for it instead).
        for w, r in ((idle_w, idle_r), (busy_w, busy_r)):
            w.write(check("reviews/reviews/1"))
            assert (await read_response(r))[0] == 200
        third_r, third_w = await asyncio.open_connection("127.0.0.1", srv.port)
        third_w.write(check("reviews/reviews/1"))
        assert (await read_response(third_r))[0] == 200
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(extra_r.read(), 5) == b""
        # A connection that keeps checking stays open past IDLE_TIMEOUT; an idle one is closed.
        for _ in range(100):  # bounded: IDLE_TIMEOUT is 2 s, these rounds take at least 10 s
            busy_w.write(check("reviews/reviews/1"))
            assert (await read_response(busy_r))[0] == 200
            if idle_r.at_eof():
                break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(idle_r.read(), 5) == b""
        busy_w.write(check("reviews/reviews/1"))
        assert (await read_response(busy_r))[0] == 200
        for w in (slow_w, idle_w, busy_w, third_w, extra_w):
            w.close()
    finally:
        await srv.close()


async def test_metric_labels_are_mesh_names_and_pseudo_headers_match_like_grpc() -> None:
    seen: list[tuple[str, str, str]] = []
    authz = AuthorizationServicer(lambda service, rule, outcome, _: seen.append((service, rule, outcome)))
    authz.set_mesh(load_mesh(MESH.replace("      - {name: tenant, allow: {headers: {X-Tenant: a}}}",
                                          "      - {name: tenant, allow: {headers: {X-Tenant: a}}}\n"
                                          "      - {name: by-host, allow: {headers: {':authority': reviews.local}}}")))
    srv = await start_http_authz(authz, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        for i in range(50):  # invented destinations share one label
            writer.write(check(f"made-up-{i}/x"))
            assert (await read_response(reader))[0] == 200
        writer.write(check("reviews/x", xfcc=None).replace(b"host: xdsd-authz", b"host: reviews.local"))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close()
    assert {s for s, _, _ in seen} == {"-", "reviews"} and ("reviews", "by-host", "allow") in seen
