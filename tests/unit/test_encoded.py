"""Large endpoint assignments encoded incrementally must be byte-for-byte what the message-building
generator produces, through any sequence of edits."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from xdsd.generators.encoded import CHUNK, AssignmentEncoder
from xdsd.generators.endpoints import load_assignment
from xdsd.model import Endpoint

ZONES = [None, "zone-a", "zone-b"]


def _ep(i: int, rnd: random.Random) -> Endpoint:
    return Endpoint(address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", port=1000 + rnd.randrange(100),
                    weight=rnd.randrange(1, 5), zone=rnd.choice(ZONES),
                    status=rnd.choice(["healthy", "healthy", "draining"]))


def _expected(name: str, eps: list[Endpoint], zone: str | None) -> bytes:
    return load_assignment(name, eps, zone).SerializeToString(deterministic=True)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(0, 3 * CHUNK + 5), zone=st.sampled_from(ZONES))
def test_encoded_equals_the_message(seed: int, size: int, zone: str | None) -> None:
    rnd = random.Random(seed)
    eps = [_ep(i, rnd) for i in range(size)]
    enc = AssignmentEncoder()
    assert enc.assignment("big", eps, zone).body == _expected("big", eps, zone)


def test_incremental_edits_stay_equal_and_reuse_chunks() -> None:
    rnd = random.Random(7)
    eps = [_ep(i, rnd) for i in range(10 * CHUNK)]
    enc = AssignmentEncoder()
    versions: dict[str, bytes] = {}
    for step in range(40):
        op = step % 4
        if op == 0:
            eps.append(_ep(100_000 + step, rnd))  # a new instance
        elif op == 1:
            del eps[rnd.randrange(len(eps))]  # one leaves (everything after it shifts)
        elif op == 2:
            i = rnd.randrange(len(eps))
            eps[i] = eps[i].model_copy(update={"status": "draining"})
        else:
            eps.insert(rnd.randrange(len(eps)), _ep(200_000 + step, rnd))
        for zone in (None, "zone-a"):
            got = enc.assignment("big", eps, zone)
            assert got.body == _expected("big", eps, zone), (step, zone)
            assert versions.setdefault(got.version, got.body) == got.body  # a version names one content
        enc.sweep()
    assert len(versions) > 60  # (an edit may repeat content, e.g. draining a draining endpoint)


def test_an_unchanged_assignment_keeps_its_version() -> None:
    rnd = random.Random(1)
    eps = [_ep(i, rnd) for i in range(1000)]
    enc = AssignmentEncoder()
    a = enc.assignment("big", eps)
    enc.sweep()
    b = AssignmentEncoder().assignment("big", list(eps))  # another replica, same content
    assert a.version == b.version and a.body == b.body


def test_incremental_eds_decision_follows_edits() -> None:
    from xdsd.generators.endpoints import uses_eds

    rnd = random.Random(3)
    eps = [_ep(i, rnd) for i in range(5 * CHUNK)]
    enc = AssignmentEncoder()
    assert enc.uses_eds("big", eps) is True
    eps[3 * CHUNK + 7] = Endpoint(address="db.internal", port=5432)  # a host name: STRICT_DNS
    assert enc.uses_eds("big", eps) is False == uses_eds(eps)
    del eps[3 * CHUNK + 7]
    assert enc.uses_eds("big", eps) is True == uses_eds(eps)
    enc.sweep()
    eps.insert(0, Endpoint(address="db.internal", port=5432))  # everything shifts
    assert enc.uses_eds("big", eps) is False


def test_a_frozen_list_seen_again_is_not_compared_and_a_new_one_is() -> None:
    rnd = random.Random(5)
    eps = [_ep(i, rnd) for i in range(3 * CHUNK)]
    enc = AssignmentEncoder()
    assert enc.uses_eds("big", eps, frozen=True) is True
    first = enc.assignment("big", eps, frozen=True)  # the same list: its chunks as worked out above
    assert first.body == AssignmentEncoder().assignment("big", list(eps)).body
    edited = [*eps[:CHUNK], Endpoint(address="db.internal", port=5432), *eps[CHUNK + 1:]]
    assert enc.uses_eds("big", edited, frozen=True) is False
    assert enc.assignment("big", edited, frozen=True).body == AssignmentEncoder().assignment("big", edited).body
