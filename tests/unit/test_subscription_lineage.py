"""A stream up to date with the snapshot a new one was patched from looks only at the names the
patch changed. Whatever the subscriptions, ACKs and patches, that must answer exactly what the full
comparison answers (which a snapshot without lineage gets)."""

from __future__ import annotations

import random

import pytest

from xdsd import typeurls
from xdsd.cache.resources import Resource, TypeSnapshot
from xdsd.server.subscriptions import DeltaState, SotwState

NAMES = [f"r{i}" for i in range(12)]


def _resource(name: str, content: int) -> Resource:
    return Resource.from_body(name, typeurls.ENDPOINT, f"{name}={content}".encode(), f"v{content}")


def _without_lineage(ts: TypeSnapshot) -> TypeSnapshot:
    return TypeSnapshot(ts.type_url, ts.version, ts.resources, ts.eds_names, ts.total)


def _answer(got: object) -> object:
    if got is None:
        return None
    if isinstance(got, tuple):  # delta: (resources, removed)
        resources, removed = got
        return sorted((r.name, r.version) for r in resources), sorted(removed)
    return sorted((r.name, r.version) for r in got)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("kind", ["sotw", "sotw-full", "delta"])
def test_answers_with_lineage_equal_answers_without(seed: int, kind: str) -> None:
    rnd = random.Random(seed)
    full = kind == "sotw-full"
    ts = TypeSnapshot.build(typeurls.ENDPOINT, [_resource(n, 0) for n in NAMES[:8]])
    lineage_ts, plain_ts = ts, _without_lineage(ts)
    states = (DeltaState(typeurls.ENDPOINT), DeltaState(typeurls.ENDPOINT)) if kind == "delta" \
        else (SotwState(typeurls.ENDPOINT), SotwState(typeurls.ENDPOINT))
    used_lineage = 0
    for step in range(80):
        op = rnd.random()
        if op < 0.45:  # a patch: replace, add or remove a few resources
            held = dict(lineage_ts.resources)
            removed, added = [], []
            for name in rnd.sample(NAMES, rnd.randint(1, 3)):
                if name in held and rnd.random() < 0.3:
                    removed.append(held[name])
                else:
                    if name in held:
                        removed.append(held[name])
                    added.append(_resource(name, rnd.randint(0, 2)))
            lineage_ts = lineage_ts.patch(removed, added, frozenset())
            plain_ts = _without_lineage(lineage_ts)
        elif op < 0.6:  # a subscription change
            names = rnd.sample(NAMES, rnd.randint(0, 5))
            wildcard = rnd.random() < 0.3
            dropped = rnd.sample(NAMES, 2)
            for st in states:
                if isinstance(st, DeltaState):
                    st.subscribe(["*"] if wildcard else names, dropped, {})
                else:
                    st.subscribe(["*", *names] if wildcard else names)
        a, b = states
        if isinstance(a, DeltaState) and isinstance(b, DeltaState):
            used_lineage += a._since_settled(lineage_ts) not in (None, frozenset())
            assert a.pending(lineage_ts) == b.pending(plain_ts), step
            assert _answer(a.take(lineage_ts)) == _answer(b.take(plain_ts)), step
            assert a.client == b.client
        else:
            assert isinstance(a, SotwState) and isinstance(b, SotwState)
            used_lineage += a._since_settled(lineage_ts) not in (None, frozenset())
            assert a.pending(lineage_ts, full) == b.pending(plain_ts, full), step
            assert _answer(a.take(lineage_ts, full)) == _answer(b.take(plain_ts, full)), step
            assert dict(a.sent) == dict(b.sent)
    assert used_lineage > 5


def test_lineage_is_weak_and_one_step() -> None:
    first = TypeSnapshot.build(typeurls.ENDPOINT, [_resource("a", 0), _resource("b", 0)])
    second = first.patch([first.resources["a"]], [_resource("a", 1)], frozenset())
    third = second.patch([], [_resource("c", 0)], frozenset())
    assert second.since(first) == {"a"}
    assert third.since(second) == {"c"}
    assert third.since(first) is None  # only the snapshot it was patched from
    assert third.since(third) == frozenset()
    del first
    assert second.since(None) is None  # no chain of old snapshots is kept alive
