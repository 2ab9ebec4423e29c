"""Large ClusterLoadAssignments built incrementally, straight to wire bytes.

A 10,000-endpoint service changes one endpoint at a time. Building 10,000 protobuf messages and
serializing them again for every change costs tens of milliseconds; instead each endpoint's
``LbEndpoint`` is encoded once (keyed by the frozen Endpoint object), endpoints are kept in chunks
whose bytes and digests are reused while the chunk holds the very same objects, and the assignment
is the concatenation (protobuf's wire format: a message is the concatenation of its fields, a
repeated field the concatenation of its elements). The bytes equal the deterministic serialization
of the message ``endpoints.load_assignment`` builds for the same input (tested).
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2

from xdsd import wire
from xdsd.cache.inputs import Encoded
from xdsd.model import Endpoint
from xdsd.model.fields import is_ip

ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CHUNK = 128
_ZONE = operator.attrgetter("zone")
_ADDRESS = operator.attrgetter("address")


def fill_lb_endpoint(lb: endpoint_components_pb2.LbEndpoint, ep: Endpoint) -> None:
    """One endpoint as Envoy gets it, whether encoded in chunks here or built whole (endpoints.py)."""
    sock = lb.endpoint.address.socket_address
    sock.address = ep.address
    sock.port_value = ep.port
    lb.load_balancing_weight.value = ep.weight
    if ep.status == "draining":
        lb.health_status = health_check_pb2.DRAINING


def _lb_endpoint(ep: Endpoint) -> bytes:
    lb = endpoint_components_pb2.LbEndpoint()
    fill_lb_endpoint(lb, ep)
    # As element 2 (lb_endpoints) of LocalityLbEndpoints.
    return wire.field(2, lb.SerializeToString(deterministic=True))


@dataclass(slots=True)
class _Chunk:
    endpoints: list[Endpoint]
    body: bytes
    digest: bytes


@dataclass(slots=True)
class _Facts:
    """What a chunk of endpoints says about its cluster: its zones and whether all are IPs."""

    endpoints: list[Endpoint]
    zones: frozenset[str | None]
    ips: bool


class AssignmentEncoder:
    """Keeps, per (cluster, zone), the chunks of the last encoding; shared by all node groups."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, str, str | None], list[_Chunk]] = {}
        self._used: set[tuple[str, str, str | None]] = set()
        self._facts: dict[str, list[_Facts]] = {}
        self._lists: dict[str, tuple[list[Endpoint], list[_Facts]]] = {}  # name -> (last list seen, its facts)
        self._facts_used: set[str] = set()
        # id(Endpoint) -> (Endpoint, encoded): a chunk that shifted re-uses its endpoints' bytes.
        self._endpoints: dict[int, tuple[Endpoint, bytes]] = {}
        self._endpoints_used: dict[int, tuple[Endpoint, bytes]] = {}

    def _encode(self, ep: Endpoint) -> bytes:
        hit = self._endpoints_used.get(id(ep)) or self._endpoints.get(id(ep))
        if hit is None or hit[0] is not ep:
            hit = (ep, _lb_endpoint(ep))
        self._endpoints_used[id(ep)] = hit
        return hit[1]

    def _chunked(self, name: str, endpoints: list[Endpoint], frozen: bool = False) -> list[_Facts]:
        """``endpoints`` in chunks of CHUNK, each reused (the very list object) while it holds the
        same endpoint objects, with its zones and IP-ness worked out once. ``frozen``: the caller
        never changes the list, so the very list of the last call needs no comparison at all."""
        seen = self._lists.get(name)
        if frozen and seen is not None and seen[0] is endpoints:  # e.g. EDS-or-DNS, then the encoding
            self._facts_used.add(name)
            return seen[1]
        old = self._facts.get(name, [])
        out = []
        for i, start in enumerate(range(0, len(endpoints), CHUNK)):
            part = endpoints[start:start + CHUNK]
            prev = old[i] if i < len(old) else None
            if prev is not None and len(prev.endpoints) == len(part) and all(map(operator.is_, prev.endpoints, part)):
                out.append(prev)
            else:
                out.append(_Facts(part, frozenset(map(_ZONE, part)), all(map(is_ip, map(_ADDRESS, part)))))
        self._facts[name] = out
        if frozen:
            self._lists[name] = (endpoints, out)
        else:
            self._lists.pop(name, None)
        self._facts_used.add(name)
        return out

    def _locality(self, key: tuple[str, str, str | None], parts: list[list[Endpoint]]) -> list[_Chunk]:
        old = self._chunks.get(key, [])
        chunks = []
        for i, part in enumerate(parts):
            prev = old[i] if i < len(old) else None
            if prev is not None and (prev.endpoints is part or (
                    len(prev.endpoints) == len(part) and all(map(operator.is_, prev.endpoints, part)))):
                chunks.append(prev)
                continue
            body = b"".join(self._encode(ep) for ep in part)
            chunks.append(_Chunk(part, body, hashlib.sha256(body).digest()))
        self._chunks[key] = chunks
        self._used.add(key)
        return chunks

    def assignment(self, name: str, endpoints: list[Endpoint], zone: str | None = None, frozen: bool = False) -> Encoded:
        """Same grouping and priorities as ``endpoints.load_assignment``. ``frozen``: ``endpoints``
        is never changed after the call (a model's list)."""
        facts = self._chunked(name, endpoints, frozen)
        zones: set[str | None] = set().union(*(f.zones for f in facts))
        local = zone is not None and zone in zones
        by_zone: dict[str, list[list[Endpoint]]] = {}
        if len(zones) == 1:
            # One locality: its chunks are the ones above (no regrouping, no second comparison).
            by_zone[next(iter(zones)) or ""] = [f.endpoints for f in facts]
        else:
            grouped: dict[str, list[Endpoint]] = {}
            for ep in endpoints:
                grouped.setdefault(ep.zone or "", []).append(ep)
            by_zone = {k: [eps[i:i + CHUNK] for i in range(0, len(eps), CHUNK)] for k, eps in grouped.items()}
        parts = [wire.field(1, name.encode())]
        digest = hashlib.sha256(name.encode())
        for key, eps in by_zone.items():
            chunks = self._locality((name, key, zone), eps)
            head = b""
            if key:
                head = wire.field(1, wire.field(2, key.encode()))  # locality { zone }
            tail = b""
            if local and key != zone:
                tail = wire.varint(5 << 3) + wire.varint(1)  # priority: 1
            inner = [head, *(c.body for c in chunks), tail]
            size = sum(len(x) for x in inner)
            parts.append(wire.head(2, size))
            parts.extend(inner)
            digest.update(head + tail)
            for c in chunks:
                digest.update(c.digest)
        return Encoded(name, ENDPOINT_TYPE, b"".join(parts), digest.hexdigest()[:16])

    def uses_eds(self, name: str, endpoints: list[Endpoint], frozen: bool = False) -> bool:
        """``endpoints.uses_eds`` (every address an IP), decided per chunk and remembered while
        a chunk holds the same endpoint objects."""
        return all(f.ips for f in self._chunked(name, endpoints, frozen))

    def sweep(self, partial: bool = False) -> None:
        """Forget the clusters the last revision did not encode (``partial``: the revision encoded
        only what changed; keep the others for the next one)."""
        if not partial:
            self._facts = {k: v for k, v in self._facts.items() if k in self._facts_used}
            self._lists = {k: v for k, v in self._lists.items() if k in self._facts_used}
            self._chunks = {k: v for k, v in self._chunks.items() if k in self._used}
        self._facts_used = set()
        self._used = set()
        self._endpoints, self._endpoints_used = self._endpoints_used, {}
