"""The listening side: handler lookup by ``:path``, sockets, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import grpc

from xdsd.loopbudget import IterationBudget
from xdsd.transport.connection import Connection

log = logging.getLogger(__name__)


class _CallDetails(NamedTuple):
    """What grpcio's generic handlers look at to pick a method (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS for a gRPC port: HTTP/2 by ALPN, TLS 1.2 or newer (RFC 9113 §9.2)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    return context


class ReadBudget(IterationBudget):
    """At most ``seconds`` of request handling (HTTP/2 parsing, gRPC framing, starting calls) per
    event-loop iteration, across all connections; a connection past it stops reading and takes
    its turn in a later iteration. A reconnect storm makes a thousand connections readable at
    once: handled in one iteration, their first requests alone (HPACK, the node token) held the
    loop for ~50 ms."""

    def __init__(self, seconds: float = 0.004) -> None:
        super().__init__(seconds)
        self._waiting: deque[Connection] = deque()
        self._drain_scheduled = False

    def queue(self, conn: Connection) -> None:
        self._waiting.append(conn)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        waiting = self._waiting
        while waiting and not self.exhausted():
            conn = waiting.popleft()
            try:
                conn.resume_backlog()  # charges what it spends
            except Exception:
                # As asyncio does when data_received fails; and the others still get their turn.
                log.exception("reading from %s failed", conn.peer)
                conn.abort()
        if waiting:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)


class GrpcServer:
    """Serves grpcio handler objects (``grpc.GenericRpcHandler``, generated ``add_*_to_server``)
    over HTTP/2 connections run by the event loop."""

    def __init__(self, *, max_receive_message_length: int = 4 * 1024 * 1024, max_concurrent_streams: int = 1024,
                 stream_window: int = 1 << 20, connection_window: int = 16 << 20,
                 max_header_list_size: int = 64 * 1024) -> None:
        self.max_receive_message_length = max_receive_message_length
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        self.connections: set[Connection] = set()
        self.read_budget = ReadBudget()
        self.stopping = False
        self._generic: list[grpc.GenericRpcHandler] = []
        self._methods: dict[str, grpc.RpcMethodHandler | None] = {}
        self._servers: list[asyncio.Server] = []

    # grpc.aio.Server's registration interface, so generated add_*_to_server functions work.
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)
        self._methods = {k: v for k, v in self._methods.items() if v is not None}

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self._methods[f"/{service}/{method}"] = handler

    def lookup(self, path: str) -> grpc.RpcMethodHandler | None:
        try:
            return self._methods[path]
        except KeyError:
            pass
        found = None
        details = _CallDetails(path, ())
        for generic in self._generic:
            found = generic.service(details)  # type: ignore[arg-type]
            if found is not None:
                break
        if len(self._methods) < 10_000:  # unknown paths are remembered too, up to a bound
            self._methods[path] = found
        return found

    async def listen(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Bind (not serving yet: see ``start``); returns the port, useful when ``port`` is 0."""
        loop = asyncio.get_running_loop()
        if host in ("::", ""):
            # All addresses of both families on one port, as grpcio binds "[::]" (asyncio would make
            # the IPv6 socket IPv6-only).
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                raise
            server = await loop.create_server(lambda: Connection(self), sock=sock, ssl=tls, backlog=4096,
                                              start_serving=False)
        else:
            server = await loop.create_server(
                lambda: Connection(self), host=host, port=port, ssl=tls, backlog=4096, reuse_address=True,
                start_serving=False,
            )
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        for server in self._servers:
            await server.start_serving()

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new connections and streams, let open calls end for ``grace`` seconds, then cut."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.go_away()
        tasks = [c.task for conn in self.connections for c in conn.calls.values() if c.task is not None]
        if tasks and grace:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self.connections):
            for call in list(conn.calls.values()):
                call.abandon()
            conn.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
