"""One xDS stream: its node, its per-type subscriptions, and the order in which it answers.

A stream is woken by requests and by new snapshots; each time, it works out every response it owes
(in ADS order) and hands them to the transport as bytes. It knows the protocol, not the mesh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from xdsd import typeurls, wire
from xdsd.auth.access import Caller, Denied
from xdsd.cache import Resource, Snapshot, SnapshotCache, TypeSnapshot
from xdsd.cache.cache import GroupFailed
from xdsd.loopbudget import IterationBudget
from xdsd.node import FetchMode as Transport
from xdsd.node import NodeError, NodeGroup
from xdsd.server import encode
from xdsd.server.observer import StreamObserver
from xdsd.server.subscriptions import DeltaState, SotwState, TypeState

_stream_ids = itertools.count(1)

# gRPC metadata a standalone-services node must also send on the streams our config sources open.
PROPAGATED_METADATA = ("x-xdsd-token",)

# How long LDS/RDS may wait for the endpoints of new clusters before they are sent anyway.
EDS_GATE_SECONDS = 3.0

# SotW subscriptions of this many names are recognized byte for byte when an ACK repeats them.
SAME_NAMES_FROM = 64

# What one stream may subscribe to, per type: far more names than any mesh has resources (a gateway
# of 10,000 services names 10,000 clusters), of a sensible length; and few names that the snapshot
# does not hold (a client may ask before a resource exists, not park a million names).
MAX_NAMES = 100_000
MAX_NAME_LENGTH = 1024
MAX_UNKNOWN_NAMES = 4096
MAX_NACK_TEXT = 2048  # of a NACK's error message, kept for /debug/proxies and CSDS


class ProtocolError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT."""


class Refused(Exception):
    """The client did not prove who it is (UNAUTHENTICATED), or its credentials do not allow what
    it asked (PERMISSION_DENIED): the stream ends with that status."""

    def __init__(self, denied: Denied) -> None:
        super().__init__(str(denied))
        self.denied = denied


class SecretsRefused(Exception):
    """Private keys are not sent over this connection (plaintext, not loopback): the stream ends
    with FAILED_PRECONDITION."""


# (node, gRPC metadata) -> the caller (kept for the stream's life); raises Denied.
Authenticator = Callable[[base_pb2.Node, dict[str, str]], Caller]


class WakeQueue:
    """Wakes streams for a new snapshot a batch per event-loop iteration.

    A revision can concern thousands of streams at once; woken together, their passes would all
    run in one loop iteration and hold the loop (timers, new connections, ACKs) for the whole
    fan-out. In batches, other work interleaves and no single iteration is long."""

    BATCH = 64
    # The batch adapts so that an iteration running a batch of passes stays near this long: a pass
    # that sends a 270 KB assignment costs ~50x one that sends a small one.
    TARGET_SECONDS = 0.008
    MIN_BATCH = 4

    # Building a group's first snapshot (its first node connecting) costs ~0.5-1 ms; a reconnect
    # storm brings a hundred groups at once. At most this much of it per loop iteration.
    BUILD_BUDGET_SECONDS = 0.004

    def __init__(self) -> None:
        self._queue: deque[Stream] = deque()
        self._scheduled = False
        self.batch = self.BATCH
        self._drained_at = 0.0  # when the last batch was woken, while draining continues
        self._build = IterationBudget(self.BUILD_BUDGET_SECONDS)  # snapshot building per iteration

    def may_build(self) -> bool:
        return not self._build.exhausted()

    def built(self, seconds: float) -> None:
        self._build.charge(seconds)

    def add(self, stream: Stream) -> None:
        self._queue.append(stream)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests): wake at once
            while self._queue:
                self._queue.popleft().wake.set()
            return
        self._scheduled = True
        loop.call_soon(self._drain, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.perf_counter()
        if self._drained_at:
            # The previous batch's passes ran in the iteration that just ended: size the next one.
            took = now - self._drained_at
            if took > self.TARGET_SECONDS:
                self.batch = max(self.MIN_BATCH, int(self.batch * self.TARGET_SECONDS / took))
            elif took < self.TARGET_SECONDS / 2:
                self.batch = min(self.BATCH, self.batch * 2)
        for _ in range(min(self.batch, len(self._queue))):
            self._queue.popleft().wake.set()
        if self._queue:
            self._drained_at = now
            loop.call_soon(self._drain, loop)
        else:
            self._drained_at = 0.0
            self._scheduled = False


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
    ) -> None:
        self.id = next(_stream_ids)
        self._wakes = wakes
        self.metadata = metadata or {}
        self.authenticator = authenticator
        self.caller: Caller | None = None  # who the token said the node is (None: no authentication)
        self.secrets_allowed = secrets_allowed
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
        """The first request carries the node (set_node_on_first_message_only); it decides the group."""
        if not node.id:
            raise ProtocolError("the first request of a stream must carry node.id")
        if self.authenticator is not None:
            try:
                self.caller = self.authenticator(node, self.metadata)
            except Denied as exc:
                raise Refused(exc) from None
        carried: tuple[tuple[str, str], ...] = ()
        if not self.ads:
            carried = tuple((k, self.metadata[k]) for k in PROPAGATED_METADATA if k in self.metadata)
        try:
            group = NodeGroup.from_node(node, self.transport, carried)
        except NodeError as exc:
            raise ProtocolError(str(exc)) from None
        # Keep who the node is, not its build's catalogue: Envoy sends ~100 `extensions` and its
        # client features on every stream, kilobytes per proxy that nothing here reads.
        kept = base_pb2.Node()
        kept.CopyFrom(node)
        kept.ClearField("extensions")
        kept.ClearField("client_features")
        self.node = kept
        self.group = group
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
        """A serialized DiscoveryRequest. An ACK repeats the whole subscription: a gateway holding
        10,000 clusters sends 10,000 names with every ACK, and turning them into Python strings
        and a set to find that nothing changed cost ~1 ms per ACK. When the request holds, byte
        for byte, the names (and type) of the last subscription applied for a type, it is parsed
        without them and handled as the same subscription again."""
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
        """Keep the bytes of ``req``'s names and type (the part an ACK repeats), if they can be
        told apart from the rest: version and node before, nonce and error after (as Envoy, and
        protobuf serializers generally, write them: in field order)."""
        type_url = self._type_of(req.type_url)
        self._blocks.pop(type_url, None)
        if len(req.resource_names) < SAME_NAMES_FROM:
            return  # a sidecar's few names: cheaper to compare as they are
        head_end = _skip_fields(data, 0, _HEAD_FIELDS)
        tail = b""
        if req.response_nonce:
            tail += wire.field(5, req.response_nonce.encode())
        if req.HasField("error_detail"):
            tail += wire.field(6, req.error_detail.SerializeToString(deterministic=True))
        tail_start = len(data) - len(tail)
        if head_end is None or tail_start < head_end or not data.endswith(tail):
            return
        block = data[head_end:tail_start]
        try:
            parsed = discovery_pb2.DiscoveryRequest.FromString(block)
        except Exception:  # noqa: BLE001 - not a field boundary: no fast path for this type
            return
        if (
            {f.number for f, _ in parsed.ListFields()} <= {3, 4}
            and parsed.type_url == req.type_url
            and parsed.resource_names == req.resource_names
        ):
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
        """Bounds on what a stream may subscribe to (ProtocolError -> INVALID_ARGUMENT)."""
        if total > MAX_NAMES:
            raise ProtocolError(f"resource_names: at most {MAX_NAMES} names per type on a stream, got {total}")
        held = self.snapshot.get(type_url).resources if self.snapshot is not None else None
        unknown = 0
        for name in names:
            if len(name) > MAX_NAME_LENGTH:
                raise ProtocolError(f"resource_names: a name longer than {MAX_NAME_LENGTH} characters")
            if held is not None and name not in held and name != "*":
                unknown += 1
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
        if all(st.settled is snap.get(t) and not st.must_respond for t, st in states.items()) and self._siblings_settled():
            return []  # every type is up to date with this snapshot: the common case after a fan-out
        out: list[Outgoing] = []
        ordered = [t for t in typeurls.PUSH_ORDER if t in states]
        ordered += sorted(t for t in states if t not in typeurls.PUSH_ORDER)
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
        if not gated and self._routes_current(snap):
            # Make-before-break: clusters (and their endpoints) that the new snapshot drops are
            # removed only once listeners and routes no longer point at them ("Eventual
            # consistency considerations": stale CDS clusters and EDS endpoints go last).
            for type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
                if type_url in self.states:
                    self._respond(type_url, snap, out, final=True)
        return out

    def gate_retry_in(self) -> float | None:
        if self._gate_since is None:
            return None
        return max(0.0, self._gate_since + EDS_GATE_SECONDS - time.monotonic())

    # The ordering rules span types. On ADS they all live on this stream; a node on the standalone
    # services has one stream per type, and xdsd applies the same rules across that node's streams.
    siblings: Callable[[], Iterable[Stream]] = staticmethod(lambda: ())  # type: ignore[assignment]

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
        return self.ads or any(other is not self for other in self.siblings())

    def _eds_gate_closed(self, snap: Snapshot) -> bool:
        """LDS/RDS wait until the client holds the endpoints of every EDS cluster it was sent.

        "Eventual consistency considerations": LDS updates must arrive after the CDS/EDS updates
        they depend on, or traffic is routed to a cluster that is still warming.
        """
        cds_states = self._states_of(typeurls.CLUSTER)
        if not cds_states or not (typeurls.LISTENER in self.states or typeurls.ROUTE in self.states):
            self._gate_since = None
            return False
        cds_ts = snap.get(typeurls.CLUSTER)
        if not self.ads and any(_adds_pending(cds, cds_ts) for cds in cds_states):
            # A sibling CDS stream has yet to send new clusters: routes must not overtake them.
            return self._gate_wait()
        held: set[str] = set()
        for cds in cds_states:
            held.update(cds.client.keys() if isinstance(cds, DeltaState) else cds.sent.keys())
        eds_ts = snap.get(typeurls.ENDPOINT)
        waiting = [n for n in snap.get(typeurls.CLUSTER).eds_names if n in held and n in eds_ts.resources]
        if not waiting:
            self._gate_since = None
            return False
        eds_states = self._states_of(typeurls.ENDPOINT)
        ready = all(
            any(n in eds.names and _holds(eds, n, eds_ts.resources[n]) for eds in eds_states) for n in waiting
        )
        if ready:
            self._gate_since = None
            return False
        return self._gate_wait()

    def _gate_wait(self) -> bool:
        now = time.monotonic()
        if self._gate_since is None:
            self._gate_since = now
        return now - self._gate_since < EDS_GATE_SECONDS

    def _routes_current(self, snap: Snapshot) -> bool:
        for type_url in (typeurls.LISTENER, typeurls.ROUTE):
            ts = snap.get(type_url)
            for st in self._states_of(type_url):
                if isinstance(st, DeltaState):
                    if st.pending(ts):
                        return False
                elif st.pending(ts, type_url in typeurls.FULL_STATE_TYPES):
                    return False
        return True

    def _siblings_settled(self) -> bool:
        """On ADS every type is on this stream; a standalone-services node's ordering also depends on
        its other streams, so this stream's own state does not settle it."""
        return self.ads

    def _respond(self, type_url: str, snap: Snapshot, out: list[Outgoing], *, final: bool) -> None:
        st = self.states[type_url]
        ts = snap.get(type_url)
        if st.settled is ts and not st.must_respond:
            return  # the client is up to date with ts, and no removal is held back
        defer_removals = (
            type_url in (typeurls.CLUSTER, typeurls.ENDPOINT)
            and not final
            and self._coordinated()
            and not self._routes_current(snap)
        )
        if isinstance(st, DeltaState):
            keep: frozenset[str] = frozenset()
            if defer_removals:
                keep = frozenset(st.client.keys() - ts.resources.keys())
            taken = st.take(ts, keep)
            if taken is None:
                return
            resources, removed = taken
            payload = encode.delta_response(ts.version, type_url, self._nonce(st), resources, removed)
            self._sent(st, ts.version, payload, len(resources), out)
            return
        full = type_url in typeurls.FULL_STATE_TYPES
        if defer_removals and type_url == typeurls.CLUSTER:
            # State of the world cannot withhold a removal, so send the new state plus the clusters
            # it drops; the next pass (after routes moved) sends the new state alone.
            retained = _retained(st, ts, self._previous_cluster_snapshot)
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
            if st.nack_error is not None:
                state = "NACKED"
            elif not st.sent_version:
                state = "NOT SENT"
            elif st.acked_version == st.sent_version and not _pending(st, snap):
                state = "SYNCED"
            else:
                state = "STALE"
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


_HEAD_FIELDS = frozenset({1, 2})  # DiscoveryRequest: version_info, node
_TAIL_FIELDS = frozenset({5, 6})  # response_nonce, error_detail


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _skip_fields(data: bytes, pos: int, allowed: frozenset[int], to_end: bool = False) -> int | None:
    """From ``pos``, skip length-delimited fields numbered in ``allowed``; the position of the first
    other field (or, with ``to_end``, None unless they run exactly to the end)."""
    try:
        while pos < len(data):
            key, after = _varint_at(data, pos)
            if key & 7 != 2 or key >> 3 not in allowed:
                return None if to_end else pos
            size, after = _varint_at(data, after)
            pos = after + size
    except ValueError:
        return None
    return pos if pos == len(data) else None


def _same_subscription(data: bytes, blocks: dict[str, bytes]) -> tuple[str, int, int] | None:
    """(type URL, end of the head, start of the tail) if ``data`` is head + a remembered block +
    tail, with only version and node in the head and only nonce and error in the tail."""
    head_end = _skip_fields(data, 0, _HEAD_FIELDS)
    if head_end is None:
        return None
    for type_url, block in blocks.items():
        if data.startswith(block, head_end):
            tail_start = head_end + len(block)
            if _skip_fields(data, tail_start, _TAIL_FIELDS, to_end=True) is not None:
                return type_url, head_end, tail_start
    return None


def _holds(st: SotwState | DeltaState, name: str, res: Resource) -> bool:
    if isinstance(st, DeltaState):
        return st.client.get(name) == res.version
    return st.sent.get(name) == res.version


def _adds_pending(st: SotwState | DeltaState, ts: TypeSnapshot) -> bool:
    """Does the client lack a resource (or a version of one) that it is subscribed to?"""
    if not st.requested:
        return False
    desired = st.select(ts)
    if isinstance(st, DeltaState):
        return any(st.client.get(n) != r.version for n, r in desired.items())
    return any(st.sent.get(n) != r.version for n, r in desired.items())


def _pending(st: SotwState | DeltaState, snap: Snapshot | None) -> bool:
    if snap is None:
        return False
    ts = snap.get(st.type_url)
    if isinstance(st, DeltaState):
        return st.pending(ts)
    return st.pending(ts, st.type_url in typeurls.FULL_STATE_TYPES)


def _retained(st: SotwState, ts: TypeSnapshot, previous: TypeSnapshot | None) -> list[Resource]:
    """Clusters the client holds that ``ts`` drops, as they were last sent."""
    if previous is None:
        return []
    return [
        previous.resources[name]
        for name in st.sent
        if name not in ts.resources and name in previous.resources
    ]
