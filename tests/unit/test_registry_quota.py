"""Registrations are scoped and bounded: an address:port is checked within its service only (no
service can squat another's instances), each service and each token has a quota, and the indexes
behind these checks stay exact through register, re-register, heartbeat, drain and expiry."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from xdsd.errors import FieldError
from xdsd.model import Mesh, load_mesh
from xdsd.registry.instance import RegistrationError, address_key
from xdsd.registry.merge import mesh_check
from xdsd.registry.registry import QuotaExceeded, Registry
from xdsd.registry.store import MemoryStore

SIDECAR = {"sidecar": {"inbound": {"port": 15006}, "app_port": 9080}}
MESH: Mesh = load_mesh(yaml.safe_dump({"services": {
    "reviews": SIDECAR, "details": SIDECAR, "web": {}, "api": {},
    "static": {"endpoints": [{"address": "10.9.9.9", "port": 80}]},
}}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock | None = None, **limits: int) -> Registry:
    reg = Registry(MemoryStore(), drain_seconds=5.0, clock=clock or Clock(), **limits)
    reg.mesh_check = mesh_check(lambda: MESH)
    return reg


def check_indexes(reg: Registry) -> None:
    """The indexes agree with the instances (what the O(1) checks rely on)."""
    instances = reg.instances()
    assert reg._by_address == {i.address_key: k for k, i in instances.items()}  # noqa: SLF001
    by_service = {s: {i.instance_id: i for i in instances.values() if i.service == s} for s in {k[0] for k in instances}}
    assert reg._by_service == by_service  # noqa: SLF001
    assert reg._per_token == Counter(i.token_id for i in instances.values() if i.token_id)  # noqa: SLF001
    assert reg.list() == sorted(instances.values(), key=lambda i: i.key)
    for service in by_service:
        assert reg.list(service) == sorted(by_service[service].values(), key=lambda i: i.instance_id)


# -- finding 2: squatting ---------------------------------------------------------------------


def test_another_service_cannot_block_an_instance_by_registering_its_address_first() -> None:
    reg = registry()
    squat = reg.register({"service": "details", "instance_id": "squat", "address": "10.0.0.7", "port": 15006}, "t-details")
    real = reg.register({"service": "reviews", "instance_id": "vm7", "address": "10.0.0.7", "port": 15006}, "t-reviews")
    assert real.state == "ACTIVE" and {i.key for i in reg.list()} == {squat.key, real.key}
    assert [i.instance_id for i in reg.list("reviews")] == ["vm7"]
    check_indexes(reg)


def test_within_a_service_an_address_is_one_instance_until_it_is_gone() -> None:
    clock = Clock()
    reg = registry(clock)
    reg.register({"service": "web", "instance_id": "a", "address": "2001:db8::7", "port": 80, "ttl": 5})
    for spelling in ("2001:db8::7", "2001:0db8:0:0::7", "2001:DB8::7"):
        with pytest.raises(RegistrationError) as exc:
            reg.register({"service": "web", "instance_id": "b", "address": spelling, "port": 80})
        assert [e.path for e in exc.value.errors] == ["address"]
        assert "already registered as web/a" in exc.value.errors[0].message
    reg.register({"service": "web", "instance_id": "b", "address": "2001:db8::7", "port": 81})  # another port
    reg.register({"service": "web", "instance_id": "a", "address": "2001:db8::8", "port": 80})  # a moves
    reg.register({"service": "web", "instance_id": "c", "address": "2001:db8::7", "port": 80})  # the old one is free
    reg.deregister("web", "c")
    with pytest.raises(RegistrationError):  # draining still holds it
        reg.register({"service": "web", "instance_id": "d", "address": "2001:db8::7", "port": 80})
    clock.now += 6
    reg.sweep()
    reg.register({"service": "web", "instance_id": "d", "address": "2001:db8::7", "port": 80})
    check_indexes(reg)


def test_host_names_are_one_address_whatever_their_case_or_trailing_dot() -> None:
    assert address_key("VM7.Internal.") == address_key("vm7.internal")
    reg = registry()
    reg.register({"service": "web", "instance_id": "a", "address": "vm7.internal", "port": 80})
    with pytest.raises(RegistrationError):
        reg.register({"service": "web", "instance_id": "b", "address": "VM7.internal.", "port": 80})


def test_a_static_endpoint_of_the_service_cannot_be_registered() -> None:
    reg = registry()
    with pytest.raises(RegistrationError) as exc:
        reg.register({"service": "static", "address": "10.9.9.9", "port": 80})
    assert exc.value.errors == [FieldError("address", "10.9.9.9:80 is a static endpoint of static in the mesh config")]
    reg.register({"service": "web", "address": "10.9.9.9", "port": 80})  # another service may


# -- finding 2: quotas ------------------------------------------------------------------------


def test_the_per_service_quota_refuses_new_instances_not_re_registrations() -> None:
    reg = registry(max_per_service=3)
    for i in range(3):
        reg.register({"service": "web", "instance_id": f"w{i}", "address": "10.0.0.1", "port": 100 + i})
    with pytest.raises(QuotaExceeded) as exc:
        reg.register({"service": "web", "instance_id": "w3", "address": "10.0.0.1", "port": 103})
    assert exc.value.errors[0].path == "service" and "limit per service" in exc.value.errors[0].message
    assert reg.count("web") == 3
    reg.register({"service": "web", "instance_id": "w0", "address": "10.0.0.2", "port": 100, "weight": 5})
    reg.register({"service": "api", "instance_id": "a0", "address": "10.0.0.1", "port": 103})  # other services
    reg.deregister("web", "w1")
    with pytest.raises(QuotaExceeded):  # a draining instance still counts until it is gone
        reg.register({"service": "web", "instance_id": "w3", "address": "10.0.0.1", "port": 103})
    check_indexes(reg)


def test_the_per_token_quota_counts_what_each_token_registered() -> None:
    clock = Clock()
    reg = registry(clock, max_per_token=2)
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 1, "ttl": 5}, "t1")
    reg.register({"service": "web", "instance_id": "b", "address": "10.0.0.1", "port": 2}, "t1")
    with pytest.raises(QuotaExceeded) as exc:
        reg.register({"service": "web", "instance_id": "c", "address": "10.0.0.1", "port": 3}, "t1")
    assert exc.value.errors[0].path == "token" and "limit per token" in exc.value.errors[0].message
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 1}, "t1")  # again: no new count
    reg.register({"service": "web", "instance_id": "c", "address": "10.0.0.1", "port": 3}, "t2")
    assert (reg.owned_by("t1"), reg.owned_by("t2")) == (2, 1)
    reg.register({"service": "web", "instance_id": "b", "address": "10.0.0.1", "port": 2}, "t2")  # b moves to t2
    assert (reg.owned_by("t1"), reg.owned_by("t2")) == (1, 2)
    with pytest.raises(QuotaExceeded):  # t2 is full: it cannot take a over either
        reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 1}, "t2")
    clock.now += 11
    reg.sweep()  # everything lapsed
    assert (reg.owned_by("t1"), reg.owned_by("t2")) == (0, 0)
    check_indexes(reg)


def test_without_authentication_only_the_per_service_quota_applies() -> None:
    reg = registry(max_per_token=1, max_per_service=5)
    for i in range(5):
        reg.register({"service": "web", "instance_id": f"w{i}", "address": "10.0.0.1", "port": 100 + i}, "")
    with pytest.raises(QuotaExceeded):
        reg.register({"service": "web", "instance_id": "w5", "address": "10.0.0.1", "port": 105}, "")


def test_a_refused_registration_changes_no_count() -> None:
    reg = registry(max_per_service=10, max_per_token=10)
    reg.register({"service": "web", "instance_id": "a", "address": "10.0.0.1", "port": 1}, "t1")
    for bad in ({"service": "web", "instance_id": "b", "address": "10.0.0.1", "port": 1},
                {"service": "nope", "instance_id": "b", "address": "10.0.0.1", "port": 2},
                {"service": "web", "instance_id": "b", "address": "10.0.0.1", "port": 0}):
        with pytest.raises(RegistrationError):
            reg.register(bad, "t1")
    assert reg.owned_by("t1") == 1 and reg.count("web") == 1
    check_indexes(reg)


def test_the_indexes_stay_exact_through_random_operations() -> None:
    rnd = random.Random(7)
    clock = Clock()
    reg = registry(clock, max_per_service=8, max_per_token=6)
    for _ in range(3000):
        service = rnd.choice(["web", "api"])
        iid = f"i{rnd.randrange(12)}"
        op = rnd.random()
        try:
            if op < 0.6:
                reg.register({"service": service, "instance_id": iid, "address": f"10.0.0.{rnd.randrange(4)}",
                              "port": rnd.randrange(1, 4), "ttl": rnd.choice([1, 3, 10])}, rnd.choice(["t1", "t2", ""]))
            elif op < 0.8:
                reg.heartbeat(service, iid)
            else:
                reg.deregister(service, iid)
        except (RegistrationError, QuotaExceeded, KeyError):
            pass
        clock.now += rnd.random() * 0.5
        reg.sweep()
        assert reg.count("web") <= 8 and reg.count("api") <= 8
        if rnd.random() < 0.05:
            check_indexes(reg)
    check_indexes(reg)
