"""One xDS stream: its node, its per-type subscriptions, and the order in which it answers.

A stream is woken by requests and by new snapshots; each time, it works out every response it owes
(in ADS order) and hands them to the transport as bytes. It knows the protocol, not the mesh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from xdsd import typeurls
from xdsd.auth.access import Caller
from xdsd.cache import Snapshot, SnapshotCache, TypeSnapshot
from xdsd.cache.cache import GroupFailed
from xdsd.node import FetchMode as Transport
from xdsd.node import NodeGroup
from xdsd.server import encode
from xdsd.server.ackpath import SAME_NAMES_FROM, subscription_block
from xdsd.server.ackpath import same_subscription as _same_subscription
from xdsd.server.attach import PROPAGATED_METADATA, Authenticator, ProtocolError, Refused, admit
from xdsd.server.observer import StreamObserver
from xdsd.server.ordering import endpoints_outstanding, pending, routes_current
from xdsd.server.ordering import retained as retained_clusters
from xdsd.server.subscriptions import DeltaState, SotwState, TypeState, sync_state
from xdsd.server.wake import WakeQueue

# Re-exported: where the rest of xdsd (and tests) found them before the split.
__all__ = ["PROPAGATED_METADATA", "SAME_NAMES_FROM", "Authenticator", "Outgoing", "ProtocolError", "Refused",
           "SecretsRefused", "Stream", "WakeQueue"]

_stream_ids = itertools.count(1)

# How long LDS/RDS may wait for the endpoints of new clusters before they are sent anyway.
EDS_GATE_SECONDS = 3.0


# What one stream may subscribe to, per type: far more names than any mesh has resources (a gateway
# of 10,000 services names 10,000 clusters), of a sensible length; and few names that the snapshot
# does not hold (a client may ask before a resource exists, not park a million names).
MAX_NAMES = 100_000
MAX_NAME_LENGTH = 1024
MAX_UNKNOWN_NAMES = 4096
MAX_NACK_TEXT = 2048  # of a NACK's error message, kept for /debug/proxies and CSDS


class SecretsRefused(Exception):
    """Private keys are not sent over this connection (plaintext, not loopback): the stream ends
    with FAILED_PRECONDITION."""


@dataclass(slots=True)
class Outgoing:
    type_url: str
    payload: bytes


class Stream:
    def __init__(
        self,
        cache: SnapshotCache,
        observer: StreamObserver,
        *,
        delta: bool,
        fixed_type: str | None,
        peer: str,
        metadata: dict[str, str] | None = None,
        authenticator: Authenticator | None = None,
        wakes: WakeQueue | None = None,
        secrets_allowed: bool = True,
        siblings: Callable[[str], Iterable[Stream]] | None = None,
    ) -> None:
        self.id = next(_stream_ids)
        self._wakes = wakes
        self.metadata = metadata or {}
        self.authenticator = authenticator
        self.caller: Caller | None = None  # who the token said the node is (None: no authentication)
        self.secrets_allowed = secrets_allowed
        # The ordering rules span types: on ADS they all live on this stream; a node on the standalone
        # services has a stream per type, found by node id through this handle (the server's registry).
        self._siblings = siblings
        self.failure: Exception | None = None  # why the stream must end (set by the reader or the server)
        self.cache = cache
        self.observer = observer
        self.delta = delta
        self.ads = fixed_type is None
        self.fixed_type = fixed_type
        self.peer = peer
        self.connected_at = time.time()
        self.node: base_pb2.Node | None = None
        self.group: NodeGroup | None = None
        self.snapshot: Snapshot | None = None
        self.states: dict[str, SotwState | DeltaState] = {}
        self.wake = asyncio.Event()
        self.closed = False
        self.ended = False  # the client half-closed or went away
        self._nonces = itertools.count(1)
        self._gate_since: float | None = None
        # type URL -> the serialized names and type of the last SotW subscription (on_sotw_data)
        self._blocks: dict[str, bytes] = {}

    # -- identity -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.node.id if self.node is not None else ""

    @property
    def cluster(self) -> str:
        return self.node.cluster if self.node is not None else ""

    @property
    def transport(self) -> Transport:
        if self.ads:
            return Transport.ADS
        return Transport.DELTA_GRPC if self.delta else Transport.GRPC

    def _attach(self, node: base_pb2.Node) -> None:
        """The first request carries the node: who it is decides its group (attach.admit)."""
        self.caller, self.group, self.node = admit(node, self.metadata, self.transport, self.authenticator)
        self.cache.watch(self.group, self._on_snapshot, self._on_group_failure)
        # The group's snapshot if it is built. The first node of a group has it built in a pass
        # (queued, within a build budget per loop iteration), not here: a reconnect storm reads
        # the first requests of a hundred groups in one iteration.
        self.snapshot = self.cache.current(self.group)
        self.observer.stream_opened(self)

    def regroup(self, canary: bool) -> None:
        """Move to the canary group of this node's group, or back (staged rollouts): from now on the
        stream is served that group's snapshot, and owes the client whatever differs."""
        group = self.group
        if group is None or group.canary == canary or self.closed:
            return
        self.cache.unwatch(group, self._on_snapshot)
        self.group = dataclasses.replace(group, canary=canary)
        self.cache.watch(self.group, self._on_snapshot, self._on_group_failure)
        self.snapshot = self.cache.current(self.group)  # None: built in the next pass
        self._wake()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.group is not None:
            self.cache.unwatch(self.group, self._on_snapshot)
            self.observer.stream_closed(self)
        self.wake.set()

    def _on_group_failure(self, exc: Exception) -> None:
        self.failure = GroupFailed(f"xdsd could not generate this node's configuration: {type(exc).__name__}: {exc}")
        self.wake.set()

    def _on_snapshot(self, snapshot: Snapshot, changed: set[str]) -> None:
        self.snapshot = snapshot
        if changed & self.states.keys():
            self._wake()

    def _wake(self) -> None:
        """Owed a pass: through the wake queue (a bounded number of passes per loop iteration: a
        reconnect storm or a fan-out must not run a thousand passes back to back)."""
        if self._wakes is not None:
            self._wakes.add(self)
        else:
            self.wake.set()

    def _state(self, type_url: str) -> SotwState | DeltaState:
        st = self.states.get(type_url)
        if st is None:
            if type_url == typeurls.SECRET and not self.secrets_allowed:
                raise SecretsRefused(
                    "xDS is served in plaintext (xdsd serve --xds-plaintext) and this peer is not on a loopback "
                    "address: private keys are only sent over TLS or loopback; serve xDS over TLS (the default)")
            st = DeltaState(type_url) if self.delta else SotwState(type_url)
            self.states[type_url] = st
        return st

    def _type_of(self, type_url: str) -> str:
        if self.fixed_type is not None:
            if type_url and type_url != self.fixed_type:
                raise ProtocolError(f"type_url {type_url!r} on the {typeurls.short(self.fixed_type)} service")
            return self.fixed_type
        if not type_url:
            raise ProtocolError("a request on ADS must carry type_url")
        return type_url

    # -- requests -------------------------------------------------------------------------

    def on_sotw_data(self, data: bytes) -> None:
        """A serialized DiscoveryRequest. One that repeats, byte for byte, the names and type of the
        last subscription applied for its type is parsed without them (ackpath)."""
        hit = _same_subscription(data, self._blocks) if self._blocks else None
        try:
            if hit is not None:
                type_url, head_end, tail_start = hit
                req = discovery_pb2.DiscoveryRequest.FromString(data[:head_end] + data[tail_start:])
                req.type_url = type_url
                self.on_sotw_request(req, same_names=True)
                return
            req = discovery_pb2.DiscoveryRequest.FromString(data)
        except DecodeError as exc:
            raise ProtocolError(f"malformed DiscoveryRequest: {exc}") from None
        if self.on_sotw_request(req):
            self._remember_block(data, req)

    def _remember_block(self, data: bytes, req: discovery_pb2.DiscoveryRequest) -> None:
        """Keep the bytes of ``req``'s names and type, the part an ACK repeats (ackpath)."""
        type_url = self._type_of(req.type_url)
        self._blocks.pop(type_url, None)
        block = subscription_block(data, req)
        if block is not None:
            self._blocks[type_url] = block

    def on_sotw_request(self, req: discovery_pb2.DiscoveryRequest, same_names: bool = False) -> bool:
        """Returns whether the request's subscription was applied (it was not stale).
        ``same_names``: the request repeats the names last applied for its type (on_sotw_data)."""
        if self.node is None:
            self._attach(req.node)
        type_url = self._type_of(req.type_url)
        st = self._state(type_url)
        assert isinstance(st, SotwState)
        if req.response_nonce:
            if req.response_nonce != st.sent_nonce:
                # "ACK and NACK semantics": a request whose nonce is not the latest sent for its type
                # is stale; the client will repeat its current subscription with the newer nonce.
                return False
            self._ack_or_nack(
                st,
                req.response_nonce,
                req.error_detail.message if req.HasField("error_detail") else None,
                req.version_info,
            )
        else:
            # A request without a nonce is the client's first for this type (or a fresh start):
            # it is owed a response even if we think nothing changed.
            st.must_respond = True
        if same_names and st.requested:
            changed = False
        else:
            if len(req.resource_names) > MAX_NAMES:  # before any Python string is made of them
                raise ProtocolError(f"resource_names: at most {MAX_NAMES} names per type on a stream, "
                                    f"got {len(req.resource_names)}")
            names = list(req.resource_names)
            self._check_names(type_url, names, len(names))
            changed = st.subscribe(names)
        # An ACK that repeats the subscription owes nothing: the stream is not woken (a fan-out to
        # a thousand proxies would otherwise recompute a thousand empty passes).
        if changed or st.must_respond or st.nack_error is not None:
            self._wake()
        return True

    def on_delta_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if self.node is None:
            self._attach(req.node)
        type_url = self._type_of(req.type_url)
        st = self._state(type_url)
        assert isinstance(st, DeltaState)
        if req.response_nonce and req.response_nonce == st.sent_nonce:
            self._ack_or_nack(st, req.response_nonce, req.error_detail.message if req.HasField("error_detail") else None)
        # "Incremental xDS": the nonce only correlates ACK/NACK; subscription changes carried by a
        # request with a stale nonce are honoured all the same.
        if not (req.resource_names_subscribe or req.resource_names_unsubscribe) and st.requested and req.response_nonce:
            return  # an ACK or NACK: nothing owed until the snapshot changes
        if len(req.resource_names_subscribe) > MAX_NAMES:
            raise ProtocolError(f"resource_names_subscribe: at most {MAX_NAMES} names per type on a stream")
        subscribe = list(req.resource_names_subscribe)
        if subscribe:
            self._check_names(type_url, list(st.names.union(subscribe)), len(st.names) + len(subscribe))
        if len(req.initial_resource_versions) > MAX_NAMES:
            raise ProtocolError(f"initial_resource_versions: at most {MAX_NAMES} entries")
        st.subscribe(subscribe, list(req.resource_names_unsubscribe), dict(req.initial_resource_versions))
        self._wake()

    def _check_names(self, type_url: str, names: list[str], total: int) -> None:
        """Bounds on what a stream may subscribe to (ProtocolError -> INVALID_ARGUMENT). Before the
        node's snapshot exists, every name counts as one xdsd does not serve."""
        if total > MAX_NAMES:
            raise ProtocolError(f"resource_names: at most {MAX_NAMES} names per type on a stream, got {total}")
        if names and max(map(len, names)) > MAX_NAME_LENGTH:
            raise ProtocolError(f"resource_names: a name longer than {MAX_NAME_LENGTH} characters")
        if len(names) <= MAX_UNKNOWN_NAMES:
            return
        held = self.snapshot.get(type_url).resources if self.snapshot is not None else {}
        unknown = len(set(names).difference(held.keys(), ("*",)))
        if unknown > MAX_UNKNOWN_NAMES:
            raise ProtocolError(f"resource_names: {unknown} names that xdsd does not serve "
                                f"(at most {MAX_UNKNOWN_NAMES} may be asked for ahead of time)")

    def _ack_or_nack(self, st: TypeState, nonce: str, error: str | None, accepted: str | None = None) -> None:
        if error is None and not st.nack_error and st.acked_nonce == nonce:
            return
        if error is None:
            latency = time.monotonic() - st.sent_at if st.sent_at else None
            st.ack(nonce)
            self.observer.ack(self, st.type_url, st.sent_version, latency)
        else:
            if len(error) > MAX_NACK_TEXT:  # kept for status pages: bounded
                error = error[:MAX_NACK_TEXT] + "..."
            st.nack(nonce, error or "(no message)", accepted)
            self.observer.nack(self, st.type_url, st.sent_version, st.nack_error or "")

    # -- responses ------------------------------------------------------------------------

    def responses(self) -> list[Outgoing]:
        """Every response owed now, in order: CDS, EDS, LDS, RDS, SDS, others; removals last."""
        snap = self.snapshot
        if snap is None and self.group is not None and self.cache.ready:
            wakes = self._wakes
            if wakes is not None and not wakes.may_build():
                wakes.add(self)  # this iteration has built enough: the next one
                return []
            started = time.perf_counter()
            try:
                snap = self.snapshot = self.cache.snapshot(self.group)
            except GroupFailed as exc:
                self.failure = exc
                self.wake.set()
                return []
            if wakes is not None:
                wakes.built(time.perf_counter() - started)
        if snap is None or self.group is None:
            return []  # not ready: a restarted control plane never serves an empty state
        states = self.states
        get = snap.get
        owed = [t for t, st in states.items() if st.must_respond or st.settled is not get(t)]
        if self._siblings_settled():
            if not owed:
                return []  # every type is up to date with this snapshot: the common case after a fan-out
            candidates: Iterable[str] = owed
        else:
            candidates = states
        out: list[Outgoing] = []
        ordered = [t for t in typeurls.PUSH_ORDER if t in candidates]
        if len(ordered) < len(candidates):
            ordered += sorted(t for t in candidates if t not in typeurls.PUSH_ORDER)
        gated: bool | None = None  # decided after CDS/EDS of this pass went out
        for type_url in ordered:
            if type_url in (typeurls.LISTENER, typeurls.ROUTE):
                st = states[type_url]
                if st.settled is snap.get(type_url) and not st.must_respond:
                    continue  # nothing to send, so nothing to gate
                if gated is None:
                    gated = self._eds_gate_closed(snap)
                if gated:
                    continue
            self._respond(type_url, snap, out, final=False)
        if not gated:
            # Make-before-break: clusters (and their endpoints) that the new snapshot drops are
            # removed only once listeners and routes no longer point at them ("Eventual
            # consistency considerations": stale CDS clusters and EDS endpoints go last).
            finals = [t for t in (typeurls.CLUSTER, typeurls.ENDPOINT)
                      if (st := states.get(t)) is not None and (st.must_respond or st.settled is not get(t))]
            if finals and self._routes_current(snap):
                for type_url in finals:
                    self._respond(type_url, snap, out, final=True)
        return out

    def gate_retry_in(self) -> float | None:
        """Seconds until listeners and routes held back for endpoints are sent anyway (None: none held)."""
        if self._gate_since is None:
            return None
        return max(0.0, self._gate_since + EDS_GATE_SECONDS - time.monotonic())

    def siblings(self) -> Iterable[Stream]:
        """This node's other open streams (the standalone services), including this one."""
        return self._siblings(self.node_id) if self._siblings is not None and self.node is not None else ()

    def _states_of(self, type_url: str) -> list[SotwState | DeltaState]:
        """This node's state for a type: on ADS one; on the standalone services one per stream
        (Envoy opens an EDS stream per cluster and an RDS stream per route configuration)."""
        st = self.states.get(type_url)
        if self.ads:
            return [st] if st is not None else []
        found = [st] if st is not None else []
        for other in self.siblings():
            if other is not self and other.fixed_type == type_url:
                theirs = other.states.get(type_url)
                if theirs is not None:
                    found.append(theirs)
        return found

    def _coordinated(self) -> bool:
        """Are removals held back for make-before-break: on ADS, or when the node has other streams?"""
        return self.ads or any(other is not self for other in self.siblings())

    def _eds_gate_closed(self, snap: Snapshot) -> bool:
        """LDS/RDS wait (at most EDS_GATE_SECONDS) until the client holds the endpoints of every EDS
        cluster it was sent (ordering.endpoints_outstanding)."""
        cds_states = self._states_of(typeurls.CLUSTER)
        if (cds_states and (typeurls.LISTENER in self.states or typeurls.ROUTE in self.states)
                and endpoints_outstanding(snap, cds_states, self._states_of(typeurls.ENDPOINT), self.ads)):
            return self._gate_wait()
        self._gate_since = None
        return False

    def _gate_wait(self) -> bool:
        now = time.monotonic()
        if self._gate_since is None:
            self._gate_since = now
        return now - self._gate_since < EDS_GATE_SECONDS

    def _routes_current(self, snap: Snapshot) -> bool:
        """Listeners and routes owe the client nothing of ``snap``: clusters it drops may go."""
        return routes_current(snap, self._states_of(typeurls.LISTENER), self._states_of(typeurls.ROUTE))

    def _siblings_settled(self) -> bool:
        """On ADS every type is on this stream; a standalone-services node's ordering also depends on
        its other streams, so this stream's own state does not settle it."""
        return self.ads

    def _respond(self, type_url: str, snap: Snapshot, out: list[Outgoing], *, final: bool) -> None:
        st = self.states[type_url]
        ts = snap.get(type_url)
        if st.settled is ts and not st.must_respond:
            return  # the client is up to date with ts, and no removal is held back
        # Removals of clusters and endpoints wait while listeners or routes still owe the client
        # something (make-before-break, see ``responses``).
        may_defer = type_url in (typeurls.CLUSTER, typeurls.ENDPOINT) and not final and self._coordinated()
        if isinstance(st, DeltaState):
            keep: frozenset[str] = frozenset()
            if may_defer:
                removed = st.client.keys() - ts.resources.keys()
                if removed and not self._routes_current(snap):
                    keep = frozenset(removed)
            taken = st.take(ts, keep)
            if taken is None:
                return
            resources, removed = taken
            payload = encode.delta_response(ts.version, type_url, self._nonce(st), resources, removed)
            self._sent(st, ts.version, payload, len(resources), out)
            return
        full = type_url in typeurls.FULL_STATE_TYPES
        if may_defer and type_url == typeurls.CLUSTER and not self._routes_current(snap):
            # State of the world cannot withhold a removal, so send the new state plus the clusters
            # it drops; the next pass (after routes moved) sends the new state alone.
            retained = retained_clusters(st, ts, self._previous_cluster_snapshot)
            if retained:
                resources = st.take(ts, full)
                if resources is None:
                    return
                st.sent = {**st.sent, **{r.name: r.version for r in retained}}
                st.settled = None  # the retained clusters still have to go
                version = f"{ts.version}+{len(retained)}"
                payload = encode.sotw_response(version, type_url, self._nonce(st), [*resources, *retained])
                self._sent(st, version, payload, len(resources) + len(retained), out)
                return
        resources = st.take(ts, full)
        if resources is None:
            return
        payload = encode.sotw_response(ts.version, type_url, self._nonce(st), resources)
        self._sent(st, ts.version, payload, len(resources), out)
        if type_url == typeurls.CLUSTER:
            self._previous_cluster_snapshot = ts

    _previous_cluster_snapshot: TypeSnapshot | None = None

    def _nonce(self, st: TypeState) -> str:
        nonce = str(next(self._nonces))
        st.sent_nonce = nonce
        return nonce

    def _sent(self, st: TypeState, version: str, payload: bytes, count: int, out: list[Outgoing]) -> None:
        st.sent_version = version
        st.sent_at = time.monotonic()
        out.append(Outgoing(st.type_url, payload))
        snap = self.snapshot
        latency = st.sent_at - snap.created if snap is not None else 0.0
        self.observer.response_sent(self, st.type_url, version, len(payload), count, latency)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        snap = self.snapshot
        types: dict[str, object] = {}
        for type_url, st in self.states.items():
            current = snap.get(type_url).version if snap is not None else ""
            state = sync_state(st, bool(st.sent_version), not pending(st, snap))
            types[typeurls.short(type_url)] = {
                "type_url": type_url,
                "state": state,
                "current_version": current,
                "sent_version": st.sent_version,
                "sent_nonce": st.sent_nonce,
                "acked_version": st.acked_version,
                "acked_nonce": st.acked_nonce,
                "last_nack": st.nack_error,
                "nacked_version": st.nack_version or None,
                "wildcard": st.wildcard,
                "subscribed": len(st.names),
            }
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "stream_id": self.id,
            "peer": self.peer,
            "protocol": "delta" if self.delta else "sotw",
            "transport": str(self.transport),
            "canary": bool(self.group is not None and self.group.canary),
            "connected_at": self.connected_at,
            "types": types,
        }
