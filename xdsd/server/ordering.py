"""The ordering rules that span resource types, as functions over subscription state and a snapshot.

"Eventual consistency considerations" (xDS protocol): CDS before EDS before LDS before RDS; LDS and
RDS updates must not arrive before the endpoints of the clusters they route to, and clusters (and
their endpoints) that a new snapshot drops are removed only after listeners and routes no longer
point at them (make-before-break). On ADS all types share one stream; a node on the standalone
services has a stream per type, and the same rules apply across that node's streams.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsd import typeurls
from xdsd.cache import Resource, Snapshot, TypeSnapshot
from xdsd.server.subscriptions import DeltaState, SotwState

State = SotwState | DeltaState


def holds(st: State, name: str, res: Resource) -> bool:
    """Does the client hold exactly this version of ``name``?"""
    if isinstance(st, DeltaState):
        return st.client.get(name) == res.version
    return st.sent.get(name) == res.version


def adds_pending(st: State, ts: TypeSnapshot) -> bool:
    """Does the client lack a resource (or a version of one) that it is subscribed to?"""
    if not st.requested:
        return False
    desired = st.select(ts)
    if isinstance(st, DeltaState):
        return any(st.client.get(n) != r.version for n, r in desired.items())
    return any(st.sent.get(n) != r.version for n, r in desired.items())


def pending(st: State, snap: Snapshot | None) -> bool:
    """Is anything of ``snap`` owed to this subscription?"""
    if snap is None:
        return False
    ts = snap.get(st.type_url)
    if isinstance(st, DeltaState):
        return st.pending(ts)
    return st.pending(ts, st.type_url in typeurls.FULL_STATE_TYPES)


def endpoints_outstanding(snap: Snapshot, cds_states: Sequence[State], eds_states: Sequence[State], ads: bool) -> bool:
    """Must listeners and routes wait? True while a sibling CDS stream has yet to send new clusters
    (standalone services), or the client lacks the endpoints of an EDS cluster it was sent."""
    cds_ts = snap.get(typeurls.CLUSTER)
    if not ads and any(adds_pending(cds, cds_ts) for cds in cds_states):
        return True
    sent: set[str] = set()
    for cds in cds_states:
        sent.update(cds.client.keys() if isinstance(cds, DeltaState) else cds.sent.keys())
    eds_ts = snap.get(typeurls.ENDPOINT)
    waiting = [n for n in cds_ts.eds_names if n in sent and n in eds_ts.resources]
    return not all(any(n in eds.names and holds(eds, n, eds_ts.resources[n]) for eds in eds_states) for n in waiting)


def routes_current(snap: Snapshot, lds_states: Sequence[State], rds_states: Sequence[State]) -> bool:
    """Do listeners and routes owe the client nothing of ``snap`` (so old clusters may go)?"""
    for type_url, states in ((typeurls.LISTENER, lds_states), (typeurls.ROUTE, rds_states)):
        ts = snap.get(type_url)
        for st in states:
            if isinstance(st, DeltaState):
                if st.pending(ts):
                    return False
            elif st.pending(ts, type_url in typeurls.FULL_STATE_TYPES):
                return False
    return True


def retained(st: SotwState, ts: TypeSnapshot, previous: TypeSnapshot | None) -> list[Resource]:
    """Clusters the client holds that ``ts`` drops, as they were last sent (state of the world cannot
    withhold a removal, so they are sent along until routes moved)."""
    if previous is None:
        return []
    return [previous.resources[name] for name in st.sent if name not in ts.resources and name in previous.resources]
