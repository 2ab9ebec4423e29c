"""The HTTP/1.1 ext_authz server on a real socket: decisions, framing (pipelining, split reads,
bodies), and malformed or oversized input answered with a denial instead of a crash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from xdsd.authz.http import MAX_HEAD, principal_from_xfcc, start_http_authz
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.generators.listeners import ext_authz_filter, policy_headers
from xdsd.generators.node import NodeGroup
from xdsd.model import load_mesh

MESH = """
mesh: {trust_domain: td}
services:
  reviews: {}
  productpage: {}
gateways:
  edge: {listen: {address: 0.0.0.0, port: 8080}, routes: [{prefix: /, service: reviews}]}
authorization:
  reviews:
    default: deny
    rules:
      - {name: pp-read, allow: {from: [productpage], methods: [GET, HEAD], paths: ["/reviews/*"]}}
      - {name: no-admin, deny: {paths: [/admin]}}
      - {name: tenant, allow: {headers: {X-Tenant: a}}}
      - {name: probe, dry_run: true, deny: {paths: [/reviews/probe]}}
  edge:
    rules:
      - {name: open, allow: {paths: ["/*"]}}
"""
PP = "By=spiffe://td/service/reviews;Hash=abc;URI=spiffe://td/service/productpage"


def check(path: str, method: str = "GET", xfcc: str | None = PP, extra: str = "") -> bytes:
    service, _, rest = path.partition("/")
    head = f"{method} /_xdsd/authz/{service}//{rest} HTTP/1.1\r\nhost: xdsd-authz\r\ncontent-length: 0\r\n"
    if xfcc is not None:
        head += f"x-forwarded-client-cert: {xfcc}\r\n"
    return (head + extra + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[int, list[tuple[str, str, str]]]]:
    seen: list[tuple[str, str, str]] = []
    authz = AuthorizationServicer(lambda service, rule, outcome, _: seen.append((service, rule, outcome)))
    authz.set_mesh(load_mesh(MESH))
    srv = await start_http_authz(authz, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield port, seen
    srv.close()
    await srv.wait_closed()


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
