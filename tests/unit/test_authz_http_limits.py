"""The HTTP/1.1 ext_authz port against clients that are not the mesh's Envoys: checks without a
valid node token, and connections held open to fill the port (in all, from one source, without
ever sending a check). Real sockets on loopback (127.0.0.x are all ours: several source addresses).
Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

import xdsd.authz.http as http_mod
from tests.support.authz_http import MESH, PP, check, read_response
from xdsd.auth.access import Access
from xdsd.auth.tokens import TokenSigner
from xdsd.authz.http import AuthzHttpServer, start_http_authz
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.model import load_mesh

T = 10.0
SIGNER = TokenSigner(b"k" * 32)
REVIEWS = SIGNER.issue("reviews-1", "reviews")
RATINGS = SIGNER.issue("ratings-1", "ratings")


def signed(path: str, token: str | None = REVIEWS, extra: str = "") -> bytes:
    return check(path, extra=(f"x-xdsd-token: {token}\r\n" if token is not None else "") + extra)


class _Spans:
    """A span factory that keeps what each decision's span was given (the check's headers)."""

    def __init__(self) -> None:
        self.metadata: list[list[tuple[str, str]]] = []

    def __call__(self, metadata: Any) -> Any:
        self.metadata.append(list(metadata or ()))
        return self

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass

    def end(self) -> None:
        pass


@pytest.fixture
def spans() -> _Spans:
    return _Spans()


@pytest_asyncio.fixture
async def server(spans: _Spans) -> AsyncIterator[AuthzHttpServer]:
    authz = AuthorizationServicer(span=spans)
    probe = "      - {name: probe, dry_run: true, deny: {paths: [/reviews/probe]}}\n"
    assert probe in MESH
    # A rule that would allow the check if the token were one of the request's headers.
    sees_token = "      - {name: sees-token, allow: {headers: {x-xdsd-token: " + REVIEWS + "}}}\n"
    authz.set_mesh(load_mesh(MESH.replace(probe, probe + sees_token)))
    srv = await start_http_authz(authz, "127.0.0.1", 0, access=Access(SIGNER))
    yield srv
    await srv.close()


@contextlib.contextmanager
def raised_fd_limit() -> Iterator[None]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_000:
        pytest.skip(f"needs 10,000 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), T)


async def until(check: Callable[[], bool], what: str) -> None:
    """Polls ``check`` until true, for at most T (the server takes connections on its own time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF or reset) within T."""
    try:
        return await asyncio.wait_for(reader.read(), T) == b""
    except ConnectionError:
        return True


# -- the node token ----------------------------------------------------------------------------------


async def test_every_check_needs_the_node_token_of_its_destination(server: AuthzHttpServer, spans: _Spans) -> None:
    reader, writer = await connect(server.port)
    try:
        writer.write(check("reviews/reviews/1"))  # no token: never a decision
        status, headers, body = await read_response(reader)
        assert status == 401 and headers["x-xdsd-authz"] == "deny; unauthenticated" and b"token" in body
        writer.write(signed("reviews/reviews/1", "v2.forged.token"))
        status, headers, _ = await read_response(reader)
        assert status == 401 and headers["x-xdsd-authz"] == "deny; unauthenticated"
        writer.write(signed("reviews/reviews/1", RATINGS))  # a valid token of another service
        status, headers, _ = await read_response(reader)
        assert status == 403 and headers["x-xdsd-authz"] == "deny; forbidden"
        (conn,) = server.conns
        assert not conn.authenticated
        assert not spans.metadata  # refused checks are not decisions
        writer.write(signed("reviews/reviews/1"))  # the right one: the policy decides
        assert (await read_response(reader))[0] == 200
        assert conn.authenticated
        writer.write(signed("reviews/admin"))
        status, headers, _ = await read_response(reader)
        assert status == 403 and headers["x-xdsd-authz"] == "deny; rule=no-admin"
        # The token is Envoy's credential, not the client's header: no rule sees it, no span records it.
        writer.write(signed("reviews/other"))
        status, headers, _ = await read_response(reader)
        assert status == 403 and headers["x-xdsd-authz"] == "deny; rule=default"
        assert spans.metadata and all("x-xdsd-token" not in dict(md) for md in spans.metadata)
        # Two tokens (one smuggled by the client, one added by Envoy) join into an invalid one.
        writer.write(signed("reviews/reviews/1", extra=f"x-xdsd-token: {REVIEWS}\r\n"))
        assert (await read_response(reader))[0] == 401
        writer.write(signed("reviews/reviews/1", "x", extra="connection: close\r\n"))
        assert (await read_response(reader))[0] == 401
        assert await closed(reader)
    finally:
        writer.close()


async def test_without_access_checks_need_no_token() -> None:
    authz = AuthorizationServicer()
    authz.set_mesh(load_mesh(MESH))
    srv = await start_http_authz(authz, "127.0.0.1", 0)
    try:
        reader, writer = await connect(srv.port)
        writer.write(check("reviews/reviews/1"))
        assert (await read_response(reader))[0] == 200
        writer.write(signed("reviews/reviews/1", "anything"))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close()


# -- timeouts -----------------------------------------------------------------------------------------


async def test_first_request_deadline_and_a_shorter_idle_timeout_without_a_valid_token(
        server: AuthzHttpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_mod, "SWEEP_INTERVAL", 0.05)
    monkeypatch.setattr(http_mod, "FIRST_REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(http_mod, "UNAUTHENTICATED_IDLE_TIMEOUT", 0.6)
    silent_r, silent_w = await connect(server.port)
    refused_r, refused_w = await connect(server.port)
    node_r, node_w = await connect(server.port)
    try:
        refused_w.write(check("reviews/reviews/1"))
        assert (await read_response(refused_r))[0] == 401
        node_w.write(signed("reviews/reviews/1"))
        assert (await read_response(node_r))[0] == 200
        assert await closed(silent_r)  # nothing sent: FIRST_REQUEST_TIMEOUT
        assert await closed(refused_r)  # only refused checks: UNAUTHENTICATED_IDLE_TIMEOUT
        await asyncio.sleep(0.3)
        node_w.write(signed("reviews/reviews/1"))  # the node's connection stays (IDLE_TIMEOUT)
        assert (await read_response(node_r))[0] == 200
    finally:
        for w in (silent_w, refused_w, node_w):
            w.close()


# -- connection limits (finding: 4,100 idle sockets closed the port to everyone) ------------------------


async def test_thousands_of_idle_sockets_do_not_keep_a_node_out(server: AuthzHttpServer) -> None:
    """4,100 connections that never send a check, from five addresses (so the total is reached,
    not only a source's limit). Before, the port then closed every new connection at once: a
    restarted sidecar's checks all failed (403, fail closed). Now each new connection sheds the
    oldest unauthenticated one; the node's connections, new and old, are served."""
    with raised_fd_limit():
        node_r, node_w = await connect(server.port)
        node_w.write(signed("reviews/reviews/1"))
        assert (await read_response(node_r))[0] == 200
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for i in range(4100):
                idle.append(await connect(server.port, f"127.0.0.{2 + i % 5}"))
            table = server.table
            assert table is not None
            await until(lambda: table.shed_count >= 4100 + 1 - http_mod.MAX_CONNECTIONS, "the oldest idle ones shed")
            assert len(table) <= http_mod.MAX_CONNECTIONS
            # A restarted sidecar: a new connection, its first check.
            new_r, new_w = await connect(server.port)
            new_w.write(signed("reviews/reviews/1"))
            assert (await read_response(new_r))[0] == 200
            new_w.close()
            # The node's connection that was there all along was not shed.
            node_w.write(signed("reviews/reviews/2"))
            assert (await read_response(node_r))[0] == 200
            # The oldest idle sockets were the ones shed.
            assert await closed(idle[0][0])
        finally:
            node_w.close()
            for _, w in idle:
                w.close()


async def test_a_source_over_its_limit_sheds_its_own_connections_only(server: AuthzHttpServer) -> None:
    with raised_fd_limit():
        limit = http_mod.MAX_UNAUTHENTICATED_PER_SOURCE
        other_r, other_w = await connect(server.port, "127.0.0.3")  # another source's idle connection
        idle = []
        try:
            for _ in range(limit + 100):
                idle.append(await connect(server.port, "127.0.0.2"))
            table = server.table
            assert table is not None
            await until(lambda: table.shed_count >= 100, "the busy source's oldest connections shed")
            assert table.unauthenticated("127.0.0.2") == limit
            assert table.unauthenticated("127.0.0.3") == 1
            assert await closed(idle[0][0])
            # The other source's connection was left alone, and it is served.
            other_w.write(signed("reviews/reviews/1"))
            assert (await read_response(other_r))[0] == 200
            # A node behind the busy address still gets in (shedding one of its idle neighbours),
            # and once authenticated it no longer counts against the address.
            node_r, node_w = await connect(server.port, "127.0.0.2")
            node_w.write(signed("reviews/reviews/1"))
            assert (await read_response(node_r))[0] == 200
            assert table.unauthenticated("127.0.0.2") == limit - 1
            node_w.close()
        finally:
            other_w.close()
            for _, w in idle:
                w.close()


async def test_the_table_never_sheds_an_active_node_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_mod, "MAX_CONNECTIONS", 3)
    authz = AuthorizationServicer()
    authz.set_mesh(load_mesh(MESH))
    srv = await start_http_authz(authz, "127.0.0.1", 0, access=Access(SIGNER))
    try:
        nodes = [await connect(srv.port) for _ in range(3)]
        for r, w in nodes:
            w.write(signed("reviews/reviews/1"))
            assert (await read_response(r))[0] == 200
        extra_r, extra_w = await connect(srv.port)
        assert await closed(extra_r)  # refused: every connection is a node's, and active
        for r, w in nodes:
            w.write(signed("reviews/reviews/1", extra=f"x-forwarded-client-cert: {PP}\r\n"))
            assert (await read_response(r))[0] == 200
            w.close()
        extra_w.close()
    finally:
        await srv.close()
