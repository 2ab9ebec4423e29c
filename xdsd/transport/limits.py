"""How many connections a listening port holds, and which to give up when it is full.

Both of xdsd's ports that proxies connect to (the xDS port, ``xdsd.transport``; the ext_authz HTTP
port, ``xdsd.authz.http``) keep a ``ConnectionTable``. A connection is *unauthenticated* until it
has presented a valid token (a gRPC call that passed the port's authorization; an HTTP check with a
valid node token). The rules:

- at most ``max_total`` connections;
- at most ``max_unauthenticated_per_source`` unauthenticated connections per source address (an IPv4
  address, or the /64 of an IPv6 address: one host is usually given a whole /64). Authenticated
  connections do not count here: thousands of proxies behind one NAT address are normal, and each
  authenticates with its first request;
- a new connection over a limit first sheds, oldest first, an unauthenticated connection (of the
  same source, for the per-source limit), then an authenticated one that is idle (no call in flight;
  on the HTTP port: no check for ``min_idle`` seconds), least recently used first. An authenticated
  connection with work in flight is never shed: with nothing left to shed, the new connection is
  refused.

Every operation is O(1) (insertion-ordered dicts), so a flood of connections costs no scans.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar


class Sheddable(Protocol):
    def shed(self) -> None:
        """Close now: the table needs the slot (the connection was already removed from it)."""


C = TypeVar("C", bound=Sheddable)


def source_of(peername: Any) -> str:
    """The key a connection's source counts under: the IPv4 address (also when it arrives as an
    IPv4-mapped IPv6 address on a dual-stack socket), an IPv6 address's /64, or "local"."""
    if not (isinstance(peername, tuple) and peername):
        return "local"
    host = str(peername[0]).split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionTable(Generic[C]):
    """The connections of one port, in the orders in which they would be shed."""

    def __init__(self, max_total: int, max_unauthenticated_per_source: int, *, min_idle: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_total = max_total
        self.max_unauthenticated_per_source = max_unauthenticated_per_source
        self.min_idle = min_idle  # an authenticated connection is sheddable after this long idle
        self.clock = clock
        self.shed_count = 0
        self.refused_count = 0
        self._source: dict[C, str] = {}  # every connection held, and its source
        self._unauthenticated: dict[C, None] = {}  # oldest first
        self._by_source: dict[str, dict[C, None]] = {}  # unauthenticated, per source, oldest first
        self._idle: dict[C, float] = {}  # authenticated and idle, least recently used first: since when

    def __len__(self) -> int:
        return len(self._source)

    def __contains__(self, conn: object) -> bool:
        return conn in self._source

    def unauthenticated(self, source: str | None = None) -> int:
        if source is None:
            return len(self._unauthenticated)
        return len(self._by_source.get(source, ()))

    def admit(self, conn: C, source: str, *, authenticated: bool = False) -> bool:
        """Take ``conn`` (idle), shedding others if a limit is reached; False: refused (over a limit
        with nothing sheddable)."""
        if not authenticated:
            same = self._by_source.get(source)
            if same is not None and len(same) >= self.max_unauthenticated_per_source:
                self._shed(next(iter(same)))
        if len(self._source) >= self.max_total and not self._shed_one():
            self.refused_count += 1
            return False
        self._source[conn] = source
        if authenticated:
            self._idle[conn] = self.clock()
        else:
            self._unauthenticated[conn] = None
            self._by_source.setdefault(source, {})[conn] = None
        return True

    def authenticated(self, conn: C, *, busy: bool = False) -> None:
        """``conn`` presented a valid token: it no longer counts against its source's limit."""
        if conn not in self._unauthenticated:
            return
        del self._unauthenticated[conn]
        self._forget_source(conn)
        if not busy:
            self._idle[conn] = self.clock()

    def busy(self, conn: C) -> None:
        """An authenticated connection has work in flight: not sheddable until ``idle``."""
        self._idle.pop(conn, None)

    def idle(self, conn: C) -> None:
        """An authenticated connection has nothing in flight (again): it goes last in the LRU order."""
        if conn in self._source and conn not in self._unauthenticated:
            self._idle.pop(conn, None)
            self._idle[conn] = self.clock()

    def remove(self, conn: C) -> None:
        if self._source.get(conn) is None:
            return
        if conn in self._unauthenticated:
            del self._unauthenticated[conn]
            self._forget_source(conn)
        self._idle.pop(conn, None)
        del self._source[conn]

    def clear(self) -> list[C]:
        held = list(self._source)
        self._source.clear()
        self._unauthenticated.clear()
        self._by_source.clear()
        self._idle.clear()
        return held

    def _forget_source(self, conn: C) -> None:
        source = self._source[conn]
        same = self._by_source.get(source)
        if same is not None:
            same.pop(conn, None)
            if not same:
                del self._by_source[source]

    def _shed_one(self) -> bool:
        if self._unauthenticated:
            self._shed(next(iter(self._unauthenticated)))
            return True
        if self._idle:
            conn, since = next(iter(self._idle.items()))
            if self.clock() - since >= self.min_idle:
                self._shed(conn)
                return True
        return False

    def _shed(self, conn: C) -> None:
        self.remove(conn)
        self.shed_count += 1
        conn.shed()
