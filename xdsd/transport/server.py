"""The listening side: handler lookup by ``:path``, sockets, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import grpc
import h2.errors

from xdsd.loopbudget import IterationBudget
from xdsd.transport import compat
from xdsd.transport import connection as _connection
from xdsd.transport.call import INBOX_LIMIT, MESSAGE_OVERHEAD
from xdsd.transport.connection import Connection
from xdsd.transport.limits import ConnectionTable

if TYPE_CHECKING:
    from xdsd.transport.call import Call

log = logging.getLogger(__name__)

# (method path, invocation metadata, peer) -> None: the call may start and its connection counts as
# authenticated; (StatusCode.OK, _): it may start, credentials were not needed (the connection stays
# unauthenticated); any other (code, details): refused with that status before any request is read.
Authorize = Callable[[str, tuple[tuple[str, "str | bytes"], ...], str], "tuple[grpc.StatusCode, str] | None"]

# Request-message bytes handed to handlers, over all calls (handlers deserialize and handle requests
# on the loop): at most DELIVERY_RATE a second, in bursts of DELIVERY_BYTES. A message is handed out
# whenever the budget is not spent, whatever its size. The rate is above what the loop can handle
# as xDS ACKs (it does not slow them); it bounds the share of the loop that requests built to be
# expensive to parse (hundreds of thousands of tiny names) can take.
DELIVERY_BYTES = 1 << 20
DELIVERY_RATE = 32.0 * (1 << 20)
# A partly received message that got no bytes for this long while its connection or the process is
# short of buffer space may be given up (RESOURCE_EXHAUSTED) to free that space; checked this often.
STALL_SECONDS = 2.0
WATCH_INTERVAL = 1.0


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
    its turn in a later iteration: a reconnect storm makes a thousand connections readable at once,
    and their first requests (HPACK, the node token) must not all be handled in one iteration."""

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


def _smallest_need(conns: Iterable[Connection]) -> int:
    """The fewest bytes one partly received message of these connections still needs (0: none)."""
    return min((c._need for conn in conns for c in conn.calls.values() if c._need), default=0)


class DeliveryBudget:
    """Request messages are handed to handlers (a call's ``read``) at most ``rate`` bytes a second,
    in bursts of at most ``burst`` bytes, and a message is handed out whenever the budget is not
    spent, whatever its size (it may go into debt). Past it a reader waits; waiting readers take
    turns connection by connection, so one connection's many streams do not crowd out another's
    one. Handlers deserialize and handle requests on the loop: large requests arriving together are
    then handled one at a time, with time for everything else in between, not all in one loop
    iteration."""

    def __init__(self, burst: int = DELIVERY_BYTES, rate: float = DELIVERY_RATE) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = float(burst)
        self._at = 0.0  # loop time of the last refill
        self._refilled = False  # refilled in this loop iteration already
        self._timer: asyncio.TimerHandle | None = None
        self._queues: dict[Connection, deque[tuple[Call, asyncio.Future[None]]]] = {}

    def _refill(self) -> None:
        """At most once per loop iteration: the loop's clock moves on while the handlers of the
        messages handed out in this iteration run, and that time must not pay for more messages
        in the same iteration (else a handful of requests that are costly to handle would all be
        handled back to back)."""
        if self._refilled:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now
        self._refilled = True
        loop.call_soon(self._next_iteration)

    def _next_iteration(self) -> None:
        self._refilled = False

    def take(self, call: Call, size: int) -> bool:
        """May ``call`` hand out its next message (``size`` bytes) now? Charged if so."""
        if call.turn:
            call.turn = False
            return True
        if self._queues:
            return False  # others wait: after them
        self._refill()
        if self.tokens <= 0:
            return False
        self.tokens -= size
        return True

    async def wait(self, call: Call) -> None:
        """Until ``call`` is given a turn (then ``take`` says yes once, already charged)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(call.conn, deque()).append((call, waiter))
        self._arm()
        await waiter

    def _arm(self) -> None:
        if self._timer is None:
            delay = -self.tokens / self.rate if self.tokens <= 0 else 0.0
            self._timer = asyncio.get_running_loop().call_later(delay, self._next_turn)

    def _next_turn(self) -> None:
        """Hand out turns, a connection at a time, while the budget lasts (at least one)."""
        self._timer = None
        self._refill()
        queues = self._queues
        while queues and self.tokens > 0:
            conn = next(iter(queues))
            waiting = queues.pop(conn)
            call, waiter = waiting.popleft()
            if waiting:
                queues[conn] = waiting  # to the back of the line
            if waiter.done():
                continue  # its reader was cancelled
            self.tokens -= len(call._inbox[0]) if call._inbox else 0
            call.turn = True
            waiter.set_result(None)
        if queues:
            self._arm()


class GrpcServer:
    """Serves grpcio handler objects (``grpc.GenericRpcHandler``, generated ``add_*_to_server``)
    over HTTP/2 connections run by the event loop.

    Limits against clients that would exhaust it (defaults for ~5,000 proxies):

    - ``authorize``: checked when a call starts, before any of its request bytes are kept; a refused
      call gets its status at once and its DATA is dropped. A connection with no call that passed it
      is *unauthenticated*: a window of 64 KiB, and it is closed after HANDSHAKE_TIMEOUT (10 s).
    - request messages: at most ``max_receive_message_length`` (4 MiB) each; a call holds at most
      1 MiB (INBOX_LIMIT) of unread and partly received requests plus open window, or one message
      if larger; a connection at most ``max_connection_buffer`` (32 MiB); all connections together
      ``max_buffered`` (128 MiB) beyond the first 64 KiB of each. Past a limit, windows stay shut
      (flow control holds the client); a partly received message that makes no progress while
      memory is short is given up with RESOURCE_EXHAUSTED.
    - connections: ``max_connections`` (16,384) in all and ``max_unauthenticated_per_source``
      (1,024) unauthenticated ones per source address (IPv6: per /64); over a limit, unauthenticated
      connections are shed first, then idle ones; an authenticated connection with calls in flight
      is never shed, and a new connection is refused instead.
    - request messages handed to handlers: DELIVERY_RATE (32 MiB/s), in bursts of DELIVERY_BYTES
      (1 MiB), a message at least.
    """

    def __init__(self, *, max_receive_message_length: int = 4 * 1024 * 1024, max_concurrent_streams: int = 1024,
                 stream_window: int = 1 << 20, connection_window: int = 16 << 20,
                 max_header_list_size: int = 64 * 1024, authorize: Authorize | None = None,
                 max_connections: int = 16_384, max_unauthenticated_per_source: int = 1024,
                 max_connection_buffer: int = 32 << 20, max_buffered: int = 128 << 20) -> None:
        largest = max_receive_message_length + 5 + MESSAGE_OVERHEAD  # one message, as received and held
        if max_connection_buffer < max(largest, INBOX_LIMIT) or max_buffered < largest:
            raise ValueError("max_connection_buffer and max_buffered must hold a message of "
                             "max_receive_message_length")
        self.max_receive_message_length = max_receive_message_length
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        self.authorize = authorize
        self.max_connection_buffer = max_connection_buffer
        self.max_buffered = max_buffered
        self.connections: set[Connection] = set()
        self.table: ConnectionTable[Connection] = ConnectionTable(max_connections, max_unauthenticated_per_source)
        self.read_budget = ReadBudget()
        self.delivery = DeliveryBudget()
        self.buffered = 0  # request bytes held by all calls (partial and unread messages)
        self.charged = 0  # what the connections draw on max_buffered (Connection.refill)
        self.starved: dict[Connection, str] = {}  # connections whose messages wait for window: why
        self.shed_messages = 0  # partly received messages given up for memory
        self.shed_connections = 0  # connections closed for holding window they did not use
        self._retry_scheduled = False
        self._waiting = 0  # starved connections waiting for the budget
        self._watch: asyncio.TimerHandle | None = None
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

    def registered_methods(self) -> list[str]:
        """Every method path registered with ``add_registered_method_handlers`` (what this port serves)."""
        return sorted(path for path, handler in self._methods.items() if handler is not None)

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

    # -- memory: connections short of window ------------------------------------------------

    def starving(self, conn: Connection, why: str | None) -> None:
        """``conn`` has messages that cannot complete with the window it was given (``why``: "cap",
        its own limit; "budget", the process's), or no longer (None)."""
        was = self.starved.get(conn)
        if was != why:
            if was == "budget":
                self._waiting -= 1
            if why is None:
                del self.starved[conn]
            else:
                self.starved[conn] = why
                if why == "budget":
                    self._waiting += 1
                    self.retry_starved()
        if (why is not None or self.charged > self.max_buffered) and self._watch is None and not self.stopping:
            self._watch = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._watchdog)

    def waiting_for_budget(self, conn: Connection) -> bool:
        """Do connections other than ``conn`` wait for the process's budget?"""
        return self._waiting > (self.starved.get(conn) == "budget")

    def retry_starved(self) -> None:
        """Buffer space was given back: the starved connections try again (once per iteration)."""
        if not self._retry_scheduled and self.starved:
            self._retry_scheduled = True
            asyncio.get_running_loop().call_soon(self._retry)

    def _retry(self) -> None:
        """Starved connections take their turns: the one whose message is closest to complete first
        (a message that fits in what was freed completes and frees its space), then the one holding
        least."""
        self._retry_scheduled = False
        for conn in sorted(self.starved, key=lambda c: (_smallest_need((c,)) or 1 << 62, c.charge)):
            if conn.refill(turn=True):
                conn.write_out()

    def forget(self, conn: Connection) -> None:
        """``conn`` is gone (its calls released what they held)."""
        self.charged -= conn.charge
        conn.charge = 0
        self.starving(conn, None)
        self.retry_starved()

    def _watchdog(self) -> None:
        """Connections have waited for window for a while. Partly received messages whose clients
        stopped sending for STALL_SECONDS although they had window are given up (a client holding
        buffers with unfinished messages). If the waiting ones still do not fit and no partly
        received message got a byte for STALL_SECONDS (they wait for each other, and would
        forever), messages that we stopped are given up too, from the connection holding most,
        until the smallest waiting message fits."""
        self._watch = None
        loop = asyncio.get_running_loop()
        stale = loop.time() - STALL_SECONDS
        shed = self.shed_messages

        def stalled(conns: Iterable[Connection]) -> list[Call]:
            """Partial messages: those their clients stopped first, then (only if no partial message
            got a byte for STALL_SECONDS: they wait for each other) those we stopped, from the
            connection holding most, the oldest first."""
            partial = [c for conn in conns for c in conn.calls.values() if c.partial]
            if not partial:
                return []
            deadlocked = max(c.progress for c in partial) <= stale
            found = [c for c in partial if c.progress <= stale and (deadlocked or c.client_stopped(stale))]
            return sorted(found, key=lambda c: (not c.client_stopped(stale), -c.conn.charge, c.progress))

        def give_up(call: Call, waiting: list[Connection], room: Callable[[int], bool], why: str) -> bool:
            """Give ``call`` up if its client stopped it, or while the smallest message waiting for
            space (on ``waiting``) still does not fit in ``room``; False: enough was given up."""
            if not call.partial or call.progress > stale:
                return True  # it moved meanwhile
            if not call.client_stopped(stale):
                need = _smallest_need(waiting)
                if room(need):
                    return False
                if call.conn not in self.starved or (call.conn in waiting and call._need == need):
                    return True  # it got window meanwhile, or it is the message the space is made for
            self._give_up(call, why)
            return True

        for conn in [c for c, why in self.starved.items() if why == "cap"]:
            def conn_room(need: int, conn: Connection = conn) -> bool:
                return conn.partial + conn.complete + need <= self.max_connection_buffer
            for call in stalled((conn,)):
                if not give_up(call, [conn], conn_room, "the connection's request buffer is full"):
                    break
        waiting = [c for c, why in self.starved.items() if why == "budget"]
        if waiting or self.charged > self.max_buffered:
            def budget_room(need: int) -> bool:
                return self.charged + need <= self.max_buffered
            for call in stalled(self.connections):
                if not give_up(call, waiting, budget_room, "xdsd's request buffers are full"):
                    break
            # Window given for messages that never came cannot be taken back (RFC 9113 §6.9): a
            # connection sitting on it while others wait for the budget is closed.
            for conn in sorted(self.connections, key=lambda c: -c.idle_credit(stale)):
                if budget_room(_smallest_need(waiting)) or not conn.idle_credit(stale):
                    break
                log.warning("closing %s: it holds %d bytes of window it does not use, others wait for it",
                            conn.peer, conn.idle_credit(stale))
                self.shed_connections += 1
                conn.shed(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                self.forget(conn)
        if self.shed_messages > shed:
            log.warning("gave up %d partly received requests: request buffers full (%d of %d bytes charged)",
                        self.shed_messages - shed, self.charged, self.max_buffered)
        self._retry()
        if (self.starved or self.charged > self.max_buffered) and not self.stopping:
            self._watch = loop.call_later(WATCH_INTERVAL, self._watchdog)

    def _give_up(self, call: Call, why: str) -> None:
        log.debug("giving up a partly received request (%d bytes) from %s: %s", call.partial, call.peer, why)
        self.shed_messages += 1
        call.exhaust(f"xdsd: {why}; try again later")
        if call.conn.refill():
            call.conn.write_out()

    # -- sockets ----------------------------------------------------------------------------

    async def listen(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Bind (not serving yet: see ``start``); returns the port, useful when ``port`` is 0."""
        loop = asyncio.get_running_loop()
        # A TLS handshake must end within the connection's first-request deadline (which it is part of).
        handshake = {"ssl_handshake_timeout": _connection.HANDSHAKE_TIMEOUT} if tls is not None else {}
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
                                              start_serving=False, **handshake)
        else:
            server = await loop.create_server(
                lambda: Connection(self), host=host, port=port, ssl=tls, backlog=4096, reuse_address=True,
                start_serving=False, **handshake,
            )
        for listening in server.sockets:
            _connection.keepalive(listening)  # accepted connections inherit it (no system calls each)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        compat.install_huffman()
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
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
