"""Traffic policy in the mesh config: what is accepted, and how each mistake is reported."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from xdsd.errors import FieldError, MeshError
from xdsd.model import parse_mesh

BASE: dict[str, Any] = {
    "services": {
        "reviews": {
            "endpoints": [
                {"address": "127.0.0.2", "port": 8080, "zone": "zone-a", "labels": {"version": "v1"}},
                {"address": "127.0.0.3", "port": 8080, "zone": "zone-b", "labels": {"version": "v2"}},
            ],
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            "load_balancer": {"policy": "ring_hash", "hash_on": {"header": "x-user"}},
            "outlier_detection": {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "5s",
                                  "max_ejection_percent": 50},
            "circuit_breakers": {"max_connections": 100, "max_pending_requests": 10, "max_requests": 100,
                                 "max_retries": 0},
            "health_check": {"path": "/health", "interval": "2s", "timeout": "1s"},
            "routes": [{"prefix": "/", "headers": {"x-canary": "yes"}, "subset": "v2"}],
        },
        "ratings": {"endpoints": [{"address": "127.0.0.4", "port": 80}]},
        "registered": {"subsets": {"v9": {"version": "v9"}}},  # no static endpoints: nothing to check
    },
    "gateways": {
        "edge": {
            "listen": {"address": "127.0.0.1", "port": 10000},
            "routes": [
                {"path": "/exact", "methods": ["GET"], "service": "ratings", "rewrite": {"host": "x.example"}},
                {"regex": "/items/[0-9]+", "service": "reviews", "subset": "v1",
                 "mirror": {"service": "ratings", "percent": 12.5}},
                {"prefix": "/f", "service": "ratings", "fault": {"abort": {"status": 503, "percent": 5},
                                                                  "delay": {"duration": "100ms"}}},
                {"prefix": "/", "split": [{"service": "reviews", "subset": "v1", "weight": 90},
                                          {"service": "reviews", "subset": "v2", "weight": 10}]},
            ],
        }
    },
}


def data() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def errors(d: dict[str, Any]) -> list[FieldError]:
    with pytest.raises(MeshError) as info:
        parse_mesh(d)
    return info.value.errors


def one(d: dict[str, Any]) -> str:
    errs = errors(d)
    assert len(errs) == 1, errs
    return str(errs[0])


def test_the_full_policy_parses() -> None:
    mesh = parse_mesh(data())
    reviews = mesh.services["reviews"]
    assert reviews.subsets["v2"] == {"version": "v2"}
    assert reviews.outlier_detection is not None and reviews.outlier_detection.base_ejection_time == 5.0
    route = mesh.gateways["edge"].routes[3]
    assert route.destinations() == [("reviews", "v1"), ("reviews", "v2")]
    assert mesh.gateways["edge"].routes[1].destinations() == [("reviews", "v1"), ("ratings", None)]


def route(d: dict[str, Any], i: int) -> dict[str, Any]:
    return d["gateways"]["edge"]["routes"][i]  # type: ignore[no-any-return]


def test_split_weights_must_add_up_to_100() -> None:
    d = data()
    route(d, 3)["split"][1]["weight"] = 20
    assert one(d) == "gateways.edge.routes[3].split: weights must add up to 100, got 110"


@pytest.mark.parametrize("weight, message", [(-1, "must be 0..100, got -1"), (101, "must be 0..100, got 101")])
def test_split_weight_bounds(weight: int, message: str) -> None:
    d = data()
    route(d, 3)["split"][0]["weight"] = weight
    assert str(errors(d)[0]) == f"gateways.edge.routes[3].split[0].weight: {message}"


def test_unknown_subset_and_service_in_a_route() -> None:
    d = data()
    route(d, 3)["split"][1]["subset"] = "v3"
    route(d, 1)["service"] = "details"
    assert [str(e) for e in errors(d)] == [
        "gateways.edge.routes[1].service: unknown service 'details'",
        "gateways.edge.routes[3].split[1].subset: unknown subset 'v3' of 'reviews' (known: v1, v2)",
    ]


def test_a_subset_must_match_a_static_endpoint() -> None:
    d = data()
    d["services"]["reviews"]["subsets"]["v3"] = {"version": "v3"}
    assert one(d) == "services.reviews.subsets.v3: no endpoint of 'reviews' has the labels version=v3"


def test_a_subset_needs_labels() -> None:
    d = data()
    d["services"]["reviews"]["subsets"]["all"] = {}
    assert one(d) == "services.reviews.subsets.all: give the labels that select the subset's endpoints"


@pytest.mark.parametrize("field, value", [
    ("outlier_detection.interval", "0s"),
    ("outlier_detection.base_ejection_time", "0ms"),
    ("health_check.timeout", "0s"),
])
def test_zero_durations_are_rejected(field: str, value: str) -> None:
    d = data()
    section, key = field.split(".")
    d["services"]["reviews"][section][key] = value
    assert one(d) == f"services.reviews.{field}: must be greater than zero"


def test_negative_durations_are_rejected() -> None:
    d = data()
    route(d, 2)["fault"]["delay"]["duration"] = "-1s"
    assert one(d).startswith("gateways.edge.routes[2].fault.delay.duration: must be a duration")


@pytest.mark.parametrize("where, value", [
    (("fault", "abort", "percent"), 101),
    (("fault", "delay", "percent"), -0.5),
])
def test_percentages_outside_0_100(where: tuple[str, ...], value: float) -> None:
    d = data()
    target = route(d, 2)
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    assert one(d) == f"gateways.edge.routes[2].{'.'.join(where)}: must be 0..100, got {value}"


def test_mirror_and_ejection_percent_bounds() -> None:
    d = data()
    route(d, 1)["mirror"]["percent"] = 200
    d["services"]["reviews"]["outlier_detection"]["max_ejection_percent"] = 120
    assert {str(e) for e in errors(d)} == {
        "gateways.edge.routes[1].mirror.percent: must be 0..100, got 200",
        "services.reviews.outlier_detection.max_ejection_percent: must be 0..100, got 120",
    }


def test_ring_hash_needs_a_hash_key() -> None:
    d = data()
    del d["services"]["reviews"]["load_balancer"]["hash_on"]
    assert one(d) == ("services.reviews.load_balancer.hash_on: ring_hash needs a hash key: "
                      "hash_on: {header: NAME} or {cookie: NAME}")


def test_a_hash_key_needs_a_hashing_policy_and_one_source() -> None:
    d = data()
    d["services"]["reviews"]["load_balancer"]["policy"] = "least_request"
    assert one(d) == "services.reviews.load_balancer.hash_on: only used with ring_hash or maglev, not least_request"
    d = data()
    d["services"]["reviews"]["load_balancer"]["hash_on"] = {"header": "x-user", "cookie": "session"}
    assert one(d) == "services.reviews.load_balancer.hash_on: give exactly one of header or cookie"


def test_a_route_has_exactly_one_path_match_and_one_target() -> None:
    d = data()
    route(d, 0)["prefix"] = "/exact"
    route(d, 3)["service"] = "reviews"
    assert [str(e) for e in errors(d)] == [
        "gateways.edge.routes[0]: give exactly one of prefix, path (exact) or regex",
        "gateways.edge.routes[3].split: give either service (and subset) or split, not both",
    ]


def test_bad_regex_method_and_header() -> None:
    d = data()
    route(d, 1)["regex"] = "/items/(?!admin)"
    route(d, 0)["methods"] = ["FETCH"]
    route(d, 2)["headers"] = {"X-Upper": "1"}
    assert one(d) == "gateways.edge.routes[2].headers.X-Upper: 'X-Upper' is not a lower-case HTTP header name"
    route(d, 2)["headers"] = {}
    assert [str(e) for e in errors(d)] == [
        "gateways.edge.routes[0].methods[0]: unknown HTTP method 'FETCH'",
        "gateways.edge.routes[1].regex: lookaround and backreferences are not supported (RE2 syntax)",
    ]


def test_same_match_twice() -> None:
    d = data()
    route(d, 2).update({"prefix": "/", "headers": {"x-canary": "yes"}})
    route(d, 3)["headers"] = {"x-canary": "yes"}
    assert one(d) == "gateways.edge.routes[3]: same match as routes[2]; it could never match"


def test_a_services_routes_stay_within_the_service() -> None:
    d = data()
    d["services"]["reviews"]["routes"] = [
        {"prefix": "/", "split": [{"service": "ratings", "weight": 50}, {"subset": "v1", "weight": 50}]},
    ]
    assert one(d) == "services.reviews.routes[0].split[0].service: a service's routes send to 'reviews' (and its subsets) only"


def test_fault_and_rewrite_need_content() -> None:
    d = data()
    route(d, 2)["fault"] = {}
    route(d, 1)["rewrite"] = {"prefix": "/x"}
    assert [str(e) for e in errors(d)] == [
        "gateways.edge.routes[1].rewrite.prefix: needs a prefix or exact path match, not regex",
        "gateways.edge.routes[2].fault: give delay and/or abort",
    ]


def test_circuit_breaker_bounds() -> None:
    d = data()
    d["services"]["reviews"]["circuit_breakers"]["max_connections"] = 0
    assert one(d) == "services.reviews.circuit_breakers.max_connections: must be 1..1000000000, got 0"


def test_readme_traffic_policy_example_is_valid() -> None:
    from pathlib import Path

    from xdsd.generators import NodeGroup, generate
    from xdsd.model import load_mesh

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Traffic policy", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    mesh = load_mesh(block)
    assert set(mesh.services["reviews"].subsets) == {"v1", "v2"}
    assert generate(mesh, NodeGroup("edge", zone="zone-a"))


def test_retry_budget_validation() -> None:
    from xdsd.errors import MeshError
    from xdsd.model import load_mesh

    base = "services:\n  web:\n    endpoints: [{address: 10.0.0.1, port: 80}]\n    circuit_breakers: "
    load_mesh(base + "{retry_budget: {percent: 20, min_concurrency: 3}}\n")
    for cb, expected in (
        ("{max_retries: 3, retry_budget: {}}", "services.web.circuit_breakers.retry_budget: give max_retries or retry_budget, not both"),
        ("{retry_budget: {percent: 0}}", "services.web.circuit_breakers.retry_budget.percent: must be above 0, got 0"),
        ("{retry_budget: {percent: 120}}", "services.web.circuit_breakers.retry_budget.percent: must be 0..100, got 120"),
    ):
        try:
            load_mesh(base + cb + "\n")
        except MeshError as exc:
            assert expected in str(exc), str(exc)
        else:
            raise AssertionError(f"{cb} was accepted")
