"""Envoy's ext_authz over plain HTTP/1.1 (the filter's ``http_service``): the same decisions as the
gRPC servicer, at a fraction of Python gRPC's per-call cost.

Envoy sends each check as a bodiless request with the original method and the path
``/_xdsd/authz/<service>/`` + the request's (normalized) path, plus the headers the filter's
``allowed_headers`` lets through. The caller's SPIFFE ID comes from ``x-forwarded-client-cert``,
which the inbound listener sets from the verified peer certificate (``SANITIZE_SET``: a client
cannot supply its own). The answer is 200 (allowed), or 403 / 401 with a short body and the
decision header; Envoy forwards a denial to the client as it is. There is no answer Envoy would
treat as a transport failure except a dead connection, and then it fails closed.

The parser is deliberately small: Envoy's HTTP/1.1 codec is the only expected client. Requests are
handled in order on a keep-alive connection; anything malformed or oversized gets a 400 / 431
denial and the connection is closed.

Every check must carry the node token of the destination service in ``x-xdsd-token`` (Envoy's
bootstrap adds it to the requests of its ``xdsd_authz`` cluster); without a valid one the answer is
401 (403 for a valid token of another service) with ``x-xdsd-authz: deny; unauthenticated``
(``deny; forbidden``), never a decision. The token is never evaluated as a request header, nor
recorded. A connection is *authenticated* once it sent a valid token (with no ``access``: once it
sent a well-formed check); see ``xdsd.transport.limits`` for how connections are limited and shed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from typing import TYPE_CHECKING

from xdsd.auth.access import Denied
from xdsd.auth.tokens import TOKEN_HEADER
from xdsd.authz.contract import DECISION_HEADER, DRY_RUN_HEADER, PATH_PREFIX, XFCC
from xdsd.authz.policy import Decision
from xdsd.authz.servicer import (
    NO_METADATA,
    denial_body,
    denial_header,
    dry_run_text,
    is_unauthenticated,
)
from xdsd.transport.limits import ConnectionTable, source_of

if TYPE_CHECKING:
    from xdsd.auth.access import Access
    from xdsd.authz.servicer import AuthorizationServicer

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # Envoy's own limit on request headers is 60 KiB by default
MAX_BODY = 1024 * 1024  # checks carry no body unless a filter asks for one; skipped either way
MAX_CONNECTIONS = 4096  # Envoy opens one per check in flight per worker; xDS shares the process's files
# Unauthenticated connections per source address (IPv6: per /64); authenticated ones count only in
# MAX_CONNECTIONS (the nodes behind one NAT address share it). Over either limit a new connection
# sheds the oldest unauthenticated one, then the one authenticated longest idle (at least
# ACTIVE_SECONDS), and is refused only if every connection is authenticated and active.
MAX_UNAUTHENTICATED_PER_SOURCE = 1024
ACTIVE_SECONDS = 5.0
FIRST_REQUEST_TIMEOUT = 5.0  # seconds from accepting a connection (TLS handshake included) to its first head
HEAD_TIMEOUT = 10.0  # seconds for a started head to complete (Envoy sends a head in one piece)
UNAUTHENTICATED_IDLE_TIMEOUT = 10.0  # seconds without a check, for a connection that never sent a valid token
IDLE_TIMEOUT = 300.0  # seconds without a check; the bootstrap's cluster closes idle ones after 60 s
SWEEP_INTERVAL = 1.0

_ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 431: "Request Header Fields Too Large"}
_REFUSED_BODY = b"xdsd authorization: the check's node token was refused\n"




_XFCC_URI = re.compile(r'(?:^|[;,])\s*uri=(?:"((?:[^"\\]|\\.)*)"|([^;,]*))', re.IGNORECASE)


def principal_from_xfcc(value: str) -> str:
    """The caller's URI SAN from Envoy's ``x-forwarded-client-cert``: ``By=...;Hash=...;URI=spiffe://...``.
    Values may be quoted (with ``;`` ``,`` inside); with several elements (proxies in a chain) the
    last one is the hop that reached us. Only the inbound listener's own (SANITIZE_SET) value gets here."""
    uri = ""
    for quoted, plain in _XFCC_URI.findall(value):
        uri = quoted.replace('\\"', '"') if quoted else plain.strip()
    return uri


def _response(status: int, headers: list[tuple[str, str]], body: bytes, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Denied')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"content-length: {len(body)}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return out if head_only else out + body


def decision_response(decision: Decision, principal: str, head_only: bool = False) -> bytes:
    dry = dry_run_text(decision)
    if decision.allowed:
        return _ALLOW if not dry else _response(200, [(DRY_RUN_HEADER, dry)], b"", head_only)
    status = 401 if is_unauthenticated(decision, principal) else 403
    headers = [("content-type", "text/plain"), (DECISION_HEADER, denial_header(decision))]
    if dry:
        headers.append((DRY_RUN_HEADER, dry))
    return _response(status, headers, denial_body(decision).encode(), head_only)


class AuthzHttpProtocol(asyncio.Protocol):
    """One keep-alive connection from an Envoy; requests are answered in order as they arrive.

    Bounded: the first head must arrive within FIRST_REQUEST_TIMEOUT of the connection, any head is
    at most MAX_HEAD bytes and must complete within HEAD_TIMEOUT; a connection idle for IDLE_TIMEOUT
    is closed (Envoy's side closes first: the bootstrap cluster's idle timeout is shorter), for
    UNAUTHENTICATED_IDLE_TIMEOUT if it never sent a valid token; when the peer stops reading our
    answers, we stop reading its checks (asyncio flow control), so unread answers cannot pile up in
    memory. The port's ConnectionTable decides which connections to shed when it is full."""

    __slots__ = ("_authz", "_conns", "_table", "_access", "_transport", "_buf", "_scan", "_skip", "_paused",
                 "_since", "_partial", "_accepted", "_requests", "authenticated", "_refusals")

    def __init__(self, authz: AuthorizationServicer, conns: set[AuthzHttpProtocol],
                 table: ConnectionTable[AuthzHttpProtocol] | None = None, access: Access | None = None) -> None:
        self._authz = authz
        self._conns = conns
        self._table = table
        self._access = access
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the head resumes (no quadratic rescans)
        self._skip = 0  # body bytes still to discard
        self._paused = False  # the peer is not reading our answers
        self._since = time.monotonic()  # last activity, or when the pending partial head began
        self._partial = False
        self._accepted = self._since  # made when accepted: before a TLS handshake
        self._requests = 0
        self.authenticated = False  # sent a valid token (with no access: a well-formed check)
        self._refusals = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        table = self._table
        if table is not None and not table.admit(self, source_of(transport.get_extra_info("peername"))):
            log.warning("authz HTTP: %d connections open, every one authenticated and active; refusing another",
                        len(table))
            transport.abort()
            self._transport = None
            return
        self._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._conns.discard(self)
        if self._table is not None:
            self._table.remove(self)

    def shed(self) -> None:
        """The table needs this connection's slot (it is unauthenticated, or authenticated and idle)."""
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._conns.discard(self)

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
            self._process()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._process()

    def expired(self, now: float) -> bool:
        """Called by the sweeper: no first head in time, a head that takes too long, or a connection
        idle too long."""
        if not self._requests and now - self._accepted > FIRST_REQUEST_TIMEOUT:
            return True
        if self._partial:
            return now - self._since > HEAD_TIMEOUT
        return now - self._since > (IDLE_TIMEOUT if self.authenticated else UNAUTHENTICATED_IDLE_TIMEOUT)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _process(self) -> None:
        buf = self._buf
        pos = 0
        handled = False
        while pos < len(buf) and self._transport is not None and not self._paused:
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                self._skip -= n
                pos += n
                continue
            end = buf.find(b"\r\n\r\n", max(pos, self._scan))
            if end < 0:
                self._scan = max(pos, len(buf) - 3)
                if len(buf) - pos > MAX_HEAD:
                    self._fail(431, "request headers too large")
                    return
                break
            self._scan = 0
            head = bytes(buf[pos:end])
            pos = end + 4
            handled = True
            self._handle(head)
        if pos:
            del buf[:pos]
            self._scan = max(0, self._scan - pos)
        partial = bool(buf) and not self._skip
        if handled or not partial or not self._partial:
            self._since = time.monotonic()  # activity; or a new partial head starts its clock
        self._partial = partial

    def _fail(self, status: int, reason: str) -> None:
        """A malformed request still gets a decision (deny), then the connection closes."""
        assert self._transport is not None
        decision = Decision(False, "error")
        self._transport.write(_response(status, [("content-type", "text/plain"), ("connection", "close"),
                                                 (DECISION_HEADER, f"deny; {reason}")],
                                        denial_body(decision).encode(), False))
        self._transport.close()
        self._transport = None
        self._buf.clear()

    def _handle(self, head: bytes) -> None:
        start = time.perf_counter()
        assert self._transport is not None
        self._requests += 1
        text = head.decode("utf-8", "surrogateescape")
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400, "malformed request line")
            return
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._fail(400, "malformed header")
                return
            name = name.lower()
            value = value.strip(" \t")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        if "transfer-encoding" in headers:
            self._fail(400, "chunked checks are not supported")
            return
        try:
            length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._fail(400, "bad content-length")
            return
        self._skip = length
        service, principal, path = "", "", target
        if target.startswith(PATH_PREFIX):
            service, slash, path = target[len(PATH_PREFIX):].partition("/")  # see path_prefix()
            if not slash:
                service = ""
        close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
        # Envoy's credential, not the client's header: never matched by a policy, never recorded.
        token = headers.pop(TOKEN_HEADER, None)
        if self._access is not None:
            try:
                self._access.service(token, service)
            except Denied as denied:
                self._refuse(denied, service, close, head_only=method == "HEAD")
                return
        if not self.authenticated:
            self.authenticated = True
            if self._table is not None:
                self._table.authenticated(self)
        elif self._table is not None:
            self._table.idle(self)  # most recently used
        # What the gRPC CheckRequest has as headers: the pseudo-headers of the client's request.
        headers[":method"] = method
        headers[":path"] = path
        if "host" in headers:
            headers[":authority"] = headers["host"]
        try:
            principal = principal_from_xfcc(headers.get(XFCC, ""))
            decision = self._authz.evaluate(service, principal, method, path, headers, NO_METADATA) if service else (
                Decision(False, "error"))
        except Exception:  # never let a bad request become a dropped connection (Envoy would fail closed silently)
            log.exception("authorization check failed; denying")
            decision = Decision(False, "error")
        out = decision_response(decision, principal, head_only=method == "HEAD")
        if close:
            self._transport.write(out)
            self._transport.close()
            self._transport = None
        else:
            self._transport.write(out)
        self._authz.record(service, decision, principal, method, path, headers.items(), start,
                           time.perf_counter() - start)

    def _refuse(self, denied: Denied, service: str, close: bool, head_only: bool) -> None:
        """A check without a valid token for its destination: 401 (403: a valid token of another
        service or kind), never a decision."""
        assert self._transport is not None
        self._refusals += 1
        if self._refusals == 1:  # once per connection: a misconfigured node would log every check
            log.warning("authz HTTP: refused a check for %r from %s: %s: %s", service or "-",
                        source_of(self._transport.get_extra_info("peername")), denied.reason, denied.message)
        status = 401 if denied.unauthenticated else 403
        headers = [("content-type", "text/plain"),
                   (DECISION_HEADER, "deny; unauthenticated" if denied.unauthenticated else "deny; forbidden")]
        if close:
            headers.append(("connection", "close"))
        self._transport.write(_response(status, headers, _REFUSED_BODY, head_only))
        if close:
            self._transport.close()
            self._transport = None


async def _sweep(conns: set[AuthzHttpProtocol], stop: asyncio.Event) -> None:
    """Close connections whose head is overdue or that sat idle too long (once a second)."""
    while not stop.is_set():
        now = time.monotonic()
        for conn in [c for c in conns if c.expired(now)]:
            conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL)


class AuthzHttpServer:
    """The listening socket, its connections and their sweeper."""

    def __init__(self, server: asyncio.Server, conns: set[AuthzHttpProtocol],
                 table: ConnectionTable[AuthzHttpProtocol] | None = None) -> None:
        self.server = server
        self.conns = conns
        self.table = table
        self._stop = asyncio.Event()
        self._sweeper = asyncio.create_task(_sweep(conns, self._stop))

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._stop.set()
        self.server.close()
        for conn in list(self.conns):
            conn.close()
        await self._sweeper
        await self.server.wait_closed()


async def start_http_authz(authz: AuthorizationServicer, host: str, port: int,
                           tls: ssl.SSLContext | None = None, access: Access | None = None, *,
                           max_connections: int | None = None,
                           max_unauthenticated_per_source: int | None = None) -> AuthzHttpServer:
    """Listen for Envoy's HTTP ext_authz checks (``xdsd serve --authz-http-address``). With
    ``access``, every check must carry a valid node token of its destination service."""
    loop = asyncio.get_running_loop()
    conns: set[AuthzHttpProtocol] = set()
    table: ConnectionTable[AuthzHttpProtocol] = ConnectionTable(
        MAX_CONNECTIONS if max_connections is None else max_connections,
        MAX_UNAUTHENTICATED_PER_SOURCE if max_unauthenticated_per_source is None else max_unauthenticated_per_source,
        min_idle=ACTIVE_SECONDS)
    extra = {"ssl_handshake_timeout": FIRST_REQUEST_TIMEOUT} if tls is not None else {}
    server = await loop.create_server(lambda: AuthzHttpProtocol(authz, conns, table, access), host, port, ssl=tls,
                                      reuse_address=True, backlog=4096, **extra)
    return AuthzHttpServer(server, conns, table)
