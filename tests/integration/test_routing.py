"""Routing with real Envoy: subsets and weighted splits, header/method/exact/regex matches,
rewrites, mirroring and fault injection, on one gateway."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import MeshFile
from tests.support.procs import free_port, wait_for
from tests.support.stats import binomial_bounds
from tests.support.traffic import Client, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


@dataclass
class Edge:
    ups: Upstreams
    envoy: EnvoyProcess
    base: str
    xdsd: XdsdProcess

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


def routing_mesh(ups: Upstreams, gw: int) -> str:
    (h1, p1), (h2, p2), (h3, p3) = ups.address("v1"), ups.address("v2"), ups.address("ratings")
    return f"""
services:
  reviews:
    endpoints:
      - {{address: {h1}, port: {p1}, labels: {{version: v1}}}}
      - {{address: {h2}, port: {p2}, labels: {{version: v2}}}}
    subsets: {{v1: {{version: v1}}, v2: {{version: v2}}}}
  ratings:
    endpoints: [{{address: {h3}, port: {p3}}}]
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {gw}}}
    routes:
      - {{prefix: /, headers: {{x-canary: "yes"}}, service: reviews, subset: v2}}
      - {{path: /ratings/exact, service: ratings}}
      - {{regex: "/items/[0-9]+", service: ratings}}
      - {{prefix: /write, methods: [POST, PUT], service: ratings}}
      - {{prefix: /old/, rewrite: {{prefix: /new/, host: rewritten.example}}, service: ratings}}
      - {{prefix: /mirrored, service: reviews, subset: v1, mirror: {{service: ratings, percent: 100}}}}
      - {{prefix: /faulty, service: ratings, fault: {{abort: {{status: 418, percent: 25}}}}}}
      - {{prefix: /slow, service: ratings, fault: {{delay: {{duration: 300ms, percent: 100}}}}}}
      - prefix: /
        split: [{{service: reviews, subset: v1, weight: 90}}, {{service: reviews, subset: v2, weight: 10}}]
"""


@pytest.fixture
def edge(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
         upstreams: Callable[..., Upstreams]) -> Edge:
    ups = upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3", "ratings": "127.0.0.4"})
    gw = free_port()
    mesh_file.write(routing_mesh(ups, gw))
    server = xdsd()
    envoy = envoy_factory(server, "edge-1", "edge")
    e = Edge(ups, envoy, f"http://127.0.0.1:{gw}", server)
    wait_for(lambda: send_requests(e.url("/ratings/exact"), 1)[0].app == "ratings", "routes", 30)
    return e


def test_a_90_10_canary_split_by_subset(edge: Edge) -> None:
    results = send_requests(edge.url("/reviews"), 2000)
    counts = Counter(r.app for r in results)
    assert counts["v1"] + counts["v2"] == 2000, counts
    lo, hi = binomial_bounds(2000, 0.1)  # each request picks v2 with probability 0.1
    assert lo <= counts["v2"] <= hi, counts
    # Subset clusters hold only their own endpoints.
    assert set(edge.envoy.endpoints_of("reviews~v2")) == {"%s:%d" % edge.ups.address("v2")}


def test_a_header_match_sends_every_matching_request_to_v2(edge: Edge) -> None:
    results = send_requests(edge.url("/reviews"), 200, headers={"x-canary": "yes"})
    assert Counter(r.app for r in results) == {"v2": 200}
    # Another value of the header does not match: the 90/10 split applies.
    lo, _ = binomial_bounds(100, 0.9)
    assert Counter(r.app for r in send_requests(edge.url("/reviews"), 100, headers={"x-canary": "no"}))["v1"] >= lo


def test_exact_regex_and_method_matches(edge: Edge) -> None:
    with Client(edge.base) as c:
        assert c.get("/ratings/exact").app == "ratings"
        assert c.get("/ratings/exact/more").app in ("v1", "v2")  # exact: no prefix match
        assert c.get("/items/42").app == "ratings"
        assert c.get("/items/42x").app in ("v1", "v2")  # the regex must match the whole path
        assert c.request("POST", "/write", body=b"x").app == "ratings"
        assert c.request("PUT", "/write/1", body=b"x").app == "ratings"
        assert c.get("/write").app in ("v1", "v2")  # GET is not in the route's methods


def test_prefix_and_host_rewrite(edge: Edge) -> None:
    with Client(edge.base) as c:
        resp = c.request("GET", "/old/thing?q=1")
    assert resp.status == 200
    body = resp.json()
    assert body["app"] == "ratings"
    assert body["path"] == "/new/thing?q=1"
    assert body["headers"]["host"] == "rewritten.example"


def test_mirroring_copies_requests_and_drops_the_answers(edge: Edge) -> None:
    before = edge.ups.stats("ratings")
    results = send_requests(edge.url("/mirrored"), 50)
    assert Counter(r.app for r in results) == {"v1": 50}
    wait_for(lambda: edge.ups.stats("ratings") - before >= 50, "50 mirrored requests at ratings", 10)


def test_fault_abort_percentage_and_delay(edge: Edge) -> None:
    results = send_requests(edge.url("/faulty"), 1000)
    aborted = sum(r.status == 418 for r in results)
    assert all(r.status in (200, 418) for r in results)
    lo, hi = binomial_bounds(1000, 0.25)
    assert lo <= aborted <= hi, aborted
    assert edge.envoy.stat("http.edge.fault.aborts_injected") == aborted
    start = time.monotonic()
    assert send_requests(edge.url("/slow"), 3)[-1].app == "ratings"
    # A lower bound only: each request was held (3 x 300 ms; Envoy's timers have millisecond
    # granularity). How much longer a loaded machine takes is not this test's business.
    assert time.monotonic() - start >= 0.85
    assert edge.envoy.stat("http.edge.fault.delays_injected") == 3


def test_a_bad_split_is_refused_and_the_last_good_routes_keep_serving(edge: Edge, mesh_file: MeshFile) -> None:
    mesh_file.update(lambda m: m["gateways"]["edge"]["routes"][-1]["split"][1].update(weight=20))
    server_errors = "gateways.edge.routes[8].split: weights must add up to 100, got 110"
    proc = edge.xdsd
    wait_for(lambda: proc.metric_value("xdsd_config_rejections_total") >= 1, "the rejection", 15)
    assert server_errors in proc.admin_get_json("/debug/config")["last_error"]
    # Envoy still has the last good split (90/10, not the refused 90/20), and it serves.
    routes = edge.envoy.config_dump("dynamic_route_configs")["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
    split = {c["name"]: c["weight"] for c in routes[-1]["route"]["weighted_clusters"]["clusters"]}
    assert split == {"reviews~v1": 90, "reviews~v2": 10}, split
    assert {r.status for r in send_requests(edge.url("/reviews"), 20)} == {200}
