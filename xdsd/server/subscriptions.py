"""Per-stream, per-type protocol state: what the client subscribed to, what it holds, and what
it acknowledged. One class for each protocol variant; both are pure (no I/O, no clock).

References are to Envoy's "xDS REST and gRPC protocol" document (docs/root/api-docs/xds_protocol).
"""

from __future__ import annotations

from collections.abc import Mapping

from xdsd.cache import Resource, TypeSnapshot

WILDCARD = "*"

# A client's sync state with what xdsd serves it (per type on status pages, per resource in CSDS).
SYNCED = "SYNCED"
STALE = "STALE"
NACKED = "NACKED"
NOT_SENT = "NOT SENT"


def sync_state(st: TypeState, sent: bool, current: bool) -> str:
    """The one classification for /debug/proxies, ``xdsd status`` and CSDS. ``sent``: something was
    sent (the type, or this resource); ``current``: what was sent is what is served now."""
    if not sent:
        return NOT_SENT
    if st.nack_error is not None:
        return NACKED
    if current and st.acked_version and st.acked_version == st.sent_version:
        return SYNCED
    return STALE


class TypeState:
    """What both variants track for ACK/NACK bookkeeping and status reporting."""

    __slots__ = (
        "type_url",
        "requested",
        "must_respond",
        "settled",
        "wildcard",
        "names",
        "sent_version",
        "sent_nonce",
        "sent_at",
        "acked_version",
        "acked_nonce",
        "nack_error",
        "nack_version",
    )

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.requested = False  # the client asked for this type on this stream
        self.must_respond = False  # the client asked something that needs an answer
        # The type snapshot this client was last brought fully up to date with (nothing held back,
        # no subscription change since): while it is still current, there is nothing to work out.
        self.settled: TypeSnapshot | None = None
        self.wildcard = False
        self.names: set[str] = set()
        self.sent_version = ""
        self.sent_nonce = ""
        self.sent_at = 0.0
        self.acked_version = ""
        self.acked_nonce = ""
        self.nack_error: str | None = None
        self.nack_version = ""

    def _since_settled(self, ts: TypeSnapshot) -> frozenset[str] | None:
        """If the client was brought fully up to date with the snapshot ``ts`` was patched from
        (and owes nothing else), the only names whose answer can differ; else None.

        A registration patches one resource of thousands: this keeps a stream's work per change
        proportional to what changed, not to what it holds."""
        if self.must_respond or self.settled is None:
            return None
        return ts.since(self.settled)

    def _selects(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def select(self, ts: TypeSnapshot) -> Mapping[str, Resource]:
        """The resources of ``ts`` this client is subscribed to."""
        if self.wildcard:
            return ts.resources  # explicitly named resources are a subset of everything
        resources = ts.resources
        if len(self.names) > 4 * len(resources):  # many names ahead of time: intersect at C speed
            return {name: resources[name] for name in self.names.intersection(resources.keys())}
        chosen: dict[str, Resource] = {}
        for name in self.names:
            res = resources.get(name)
            if res is not None:
                chosen[name] = res
        return chosen

    def ack(self, nonce: str) -> None:
        self.acked_version = self.sent_version
        self.acked_nonce = nonce
        self.nack_error = None
        self.nack_version = ""

    def nack(self, nonce: str, error: str, accepted_version: str | None = None) -> None:
        # A NACK's version_info is the version the client still runs ("ACK and NACK semantics").
        if accepted_version is not None:
            self.acked_version = accepted_version
        self.nack_error = error
        self.nack_version = self.sent_version
        self.acked_nonce = nonce


class SotwState(TypeState):
    """State of the world. ``sent`` is what we last told the client, name -> version."""

    __slots__ = ("ever_named", "sent")

    def __init__(self, type_url: str) -> None:
        super().__init__(type_url)
        self.ever_named = False
        self.sent: Mapping[str, str] = {}

    def subscribe(self, resource_names: list[str]) -> bool:
        """Apply the subscription carried by a (non-stale) request; True if it changed anything.

        "How the client specifies what resources to return": ``*`` subscribes to everything; for
        historical reasons an empty list means wildcard too, but only while the client has never
        named a resource of this type on this stream. After that, an empty list means nothing.
        """
        names = set(resource_names)
        if names:
            self.ever_named = True
        wildcard = WILDCARD in names or not self.ever_named
        names.discard(WILDCARD)
        if self.requested and wildcard == self.wildcard and names == self.names:
            return False  # the usual ACK: the same subscription again
        self.wildcard = wildcard
        self.settled = None
        added = names - self.names
        dropped = self.names - names
        self.names = names
        self.requested = True
        if added:
            self.must_respond = True
        if dropped and not self.wildcard:
            # The client forgets what it unsubscribed from; a later subscribe must resend it.
            sent = dict(self.sent)
            for name in dropped:
                sent.pop(name, None)
            self.sent = sent
        return True

    def pending(self, ts: TypeSnapshot, full_state: bool) -> bool:
        """Would a response be sent now?"""
        if not self.requested or (self.settled is ts and not self.must_respond):
            return False
        diff = self._since_settled(ts)
        if diff is not None:
            differs = self._differs(ts, diff)
            # State of the world sends removals only within a full state (other types omit them).
            return bool(differs) if full_state else any(isinstance(r, Resource) for r in differs)
        desired = self.select(ts)
        if full_state:
            return self.must_respond or not _same(desired, self.sent)
        return any(self.sent.get(n) != r.version for n, r in desired.items())

    def _differs(self, ts: TypeSnapshot, diff: frozenset[str]) -> list[Resource | str]:
        """Against ``sent`` (which holds every selected resource of the snapshot ``ts`` was patched
        from, as it is there): the changed resources among ``diff``, and the names it drops."""
        out: list[Resource | str] = []
        sent = self.sent
        for name in diff:
            r = ts.resources.get(name)
            if r is not None and self._selects(name):
                if sent.get(name) != r.version:
                    out.append(r)
            elif name in sent:
                out.append(name)
        return out

    def take(self, ts: TypeSnapshot, full_state: bool) -> list[Resource] | None:
        """The resources of the next response, or None when nothing is to be sent.

        "Grouping resources into responses": Listener and Cluster responses carry the complete
        state; other types carry only what changed (Envoy keeps the resources a response omits).
        A NACKed version is never resent by itself: ``sent`` records what we sent, accepted or
        not, so only a new snapshot makes the resource differ again.
        """
        if not self.requested or (self.settled is ts and not self.must_respond):
            return None
        diff = self._since_settled(ts)
        if diff is not None:
            differs = self._differs(ts, diff)
            if not differs:
                self.settled = ts
                return None
            if not full_state:
                # Only what changed: dropped names stay in ``sent`` (as in the full pass below).
                resources = [r for r in differs if isinstance(r, Resource)]
                self.settled = ts
                if not resources:
                    return None
                sent = dict(self.sent)
                for r in resources:
                    sent[r.name] = r.version
                self.sent = sent
                return resources
        desired = self.select(ts)
        self.settled = ts  # after this call the client has (or is being sent) all of ts
        if full_state:
            if not self.must_respond and _same(desired, self.sent):
                return None
            self.sent = {n: r.version for n, r in desired.items()}
            self.must_respond = False
            return list(desired.values())
        changed = [r for n, r in desired.items() if self.sent.get(n) != r.version]
        self.must_respond = False
        if not changed:
            return None
        sent = dict(self.sent)
        for r in changed:
            sent[r.name] = r.version
        self.sent = sent
        return changed


class DeltaState(TypeState):
    """Incremental. ``client`` is what the client holds, name -> version, as far as we know."""

    __slots__ = ("client", "forced")

    def __init__(self, type_url: str) -> None:
        super().__init__(type_url)
        self.client: dict[str, str] = {}
        self.forced: set[str] = set()  # explicitly (re)subscribed names awaiting an answer

    def subscribe(self, subscribe: list[str], unsubscribe: list[str], initial: Mapping[str, str]) -> None:
        self.settled = None
        first = not self.requested
        if first:
            self.requested = True
            self.must_respond = True
            # "Incremental xDS": on reconnect, the client says what it has; send only what differs.
            self.client = dict(initial)
            # A first request that names nothing is a (legacy) wildcard subscription.
            if not subscribe:
                self.wildcard = True
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
                continue
            self.names.add(name)
            self.forced.add(name)
            if not first:
                # An explicit subscribe to a name the client holds must be answered with it again.
                self.client.pop(name, None)
        for name in unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
                for held in [n for n in self.client if n not in self.names]:
                    del self.client[held]
                continue
            self.names.discard(name)
            self.client.pop(name, None)
            if self.wildcard:
                # Still covered by the wildcard: answer with the resource (or its removal).
                self.forced.add(name)
        if subscribe:
            self.must_respond = True  # an unsubscribe alone needs no answer

    def plan(self, ts: TypeSnapshot) -> tuple[list[Resource], list[str]]:
        """What a response owes the client: (resources to send, names to remove)."""
        diff = None if self.forced else self._since_settled(ts)
        if diff is not None:
            # ``client`` is exactly what the patched-from snapshot selects: only ``diff`` can differ.
            send: list[Resource] = []
            gone: list[str] = []
            for name in diff:
                r = ts.resources.get(name)
                if r is not None and self._selects(name):
                    if self.client.get(name) != r.version:
                        send.append(r)
                elif name in self.client:
                    gone.append(name)
            return send, gone
        desired = self.select(ts)
        send = [r for n, r in desired.items() if self.client.get(n) != r.version]
        removed = [n for n in self.client if n not in desired]
        # "removed_resources" also answers a subscription to a name that does not exist.
        removed += [n for n in self.forced if n not in desired and n not in self.client]
        return send, removed

    def pending(self, ts: TypeSnapshot) -> bool:
        if not self.requested or (self.settled is ts and not self.must_respond):
            return False
        send, removed = self.plan(ts)
        return bool(send or removed)

    def take(self, ts: TypeSnapshot, keep: frozenset[str] = frozenset()) -> tuple[list[Resource], list[str]] | None:
        """The next response's resources and removals (``keep``: removals to hold back for now)."""
        if not self.requested or (self.settled is ts and not self.must_respond):
            return None
        send, removed = self.plan(ts)
        held_back = [n for n in removed if n in keep]
        removed = [n for n in removed if n not in keep]
        self.settled = None if held_back else ts
        if not send and not removed and not self.must_respond:
            return None
        for r in send:
            self.client[r.name] = r.version
        for name in removed:
            self.client.pop(name, None)
        self.forced.clear()
        self.must_respond = False
        return send, removed


def _same(desired: Mapping[str, Resource], sent: Mapping[str, str]) -> bool:
    if len(desired) != len(sent):
        return False
    return all(sent.get(n) == r.version for n, r in desired.items())

