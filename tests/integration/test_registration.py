"""VM registration with a real Envoy: instances join with one call (or `xdsd register`), leave when
their heartbeats lapse or when they deregister (draining first), and survive an xdsd restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.integration.conftest import MODES, MeshFile, Mode
from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port, wait_for
from tests.support.traffic import SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.api.v1 import registration_pb2, registration_pb2_grpc

ADS_MODES = [m for m in MODES if m.ads]


@dataclass
class Scene:
    ups: Upstreams
    xdsd: XdsdProcess
    envoy: EnvoyProcess
    gw: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw}/r"

    def api(self, path: str, body: dict[str, Any] | None = None, token: str | None = "") -> tuple[int, dict[str, Any]]:
        headers = {"content-type": "application/json"}
        service = (body or {}).get("service", "reviews")
        if token == "":
            token = self.xdsd.token("test", str(service))
        if token:
            headers["x-xdsd-token"] = token
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.xdsd.admin_port}{path}", data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def register(self, name: str, ttl: str = "10s", **extra: Any) -> dict[str, Any]:
        host, port = self.ups.addresses[name]
        status, body = self.api("/v1/register", {"service": "reviews", "instance_id": name, "address": host,
                                                 "port": port, "ttl": ttl, **extra})
        assert status == 200, body
        return body

    def endpoints(self) -> dict[str, int]:
        return self.envoy.endpoints_of("reviews")

    def has(self, name: str) -> bool:
        return "%s:%d" % self.ups.addresses[name] in self.endpoints()


@pytest.fixture
def scene(
    request: pytest.FixtureRequest,
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
) -> Scene:
    mode: Mode = getattr(request, "param", MODES[0])
    ups = start_upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3", "v3": "127.0.0.4"})
    gw = free_port()
    h, p = ups.addresses["v1"]
    mesh_file.write(f"""
services:
  reviews: {{endpoints: [{{address: {h}, port: {p}}}]}}
  ratings: {{}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {gw}}}, routes: [{{prefix: /, service: reviews}}]}}
""")
    xdsd = start_xdsd(mesh_file.path, extra_args=["--drain-time", "3"])
    envoy = start_envoy(xdsd, "edge-1", "edge", mode)
    s = Scene(ups, xdsd, envoy, gw)
    wait_for(lambda: send_requests(s.url, 1)[0].app == "v1", "traffic to the static endpoint", 30)
    return s


@pytest.mark.parametrize("scene", ADS_MODES, ids=[m.id for m in ADS_MODES], indirect=True)
def test_xdsd_register_joins_heartbeats_and_drains_on_sigterm(scene: Scene, record_property: Callable[[str, object], None]) -> None:
    host, port = scene.ups.addresses["v2"]
    t0 = time.monotonic()
    agent = subprocess.Popen(
        [sys.executable, "-m", "xdsd", "register", "--service", "reviews", "--address", host, "--port", str(port),
         "--ttl", "1s", "--admin-address", f"127.0.0.1:{scene.xdsd.admin_port}", "--state-dir", str(scene.xdsd.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: any(r.app == "v2" for r in send_requests(scene.url, 10)), "traffic on the registered instance", 30)
        joined = time.monotonic() - t0
        record_property("seconds_from_register_to_traffic", round(joined, 3))
        # Heartbeats keep it (TTL 1s) well past its TTL.
        time.sleep(2.5)
        assert scene.has("v2")
        # A slow request is in flight when the agent is stopped: it completes; new requests avoid v2.
        scene.ups.set("v2", latency_ms=1500)
        slow: list[int] = []
        th = threading.Thread(target=lambda: slow.extend(r.status for r in send_requests(scene.url, 4)))
        with SteadyTraffic(scene.url, interval=0.01) as traffic:
            th.start()
            wait_for(lambda: scene.ups.stats("v2") > 0 and any(True for _ in [0]), "a request on v2", 10)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(10) == 0
            wait_for(lambda: scene.api("/v1/instances?service=reviews")[1]["instances"][0]["state"] == "DRAINING",
                     "the instance to be DRAINING", 5)
            th.join(30)
            wait_for(lambda: not scene.has("v2"), "v2 removed after draining", 15)
        assert slow and all(s == 200 for s in slow), slow
        assert traffic.failures() == []
        out = agent.stdout.read() if agent.stdout else ""
        assert "registered reviews/" in out and "deregistered" in out
    finally:
        if agent.poll() is None:
            agent.kill()


@pytest.mark.parametrize("scene", ADS_MODES, ids=[m.id for m in ADS_MODES], indirect=True)
def test_a_lapsed_instance_leaves_within_ttl_plus_one_second_without_failures(scene: Scene) -> None:
    with SteadyTraffic(scene.url, interval=0.01) as traffic:
        scene.register("v2", ttl="2s")
        registered = time.monotonic()
        wait_for(lambda: scene.has("v2"), "v2 in Envoy", 10)
        wait_for(lambda: not scene.has("v2"), "v2 to leave Envoy", 10, interval=0.02)
        gone_after = time.monotonic() - registered
    assert gone_after <= 2.0 + 1.0, f"left after {gone_after:.2f}s (TTL 2s)"
    assert traffic.failures() == []
    assert scene.api("/v1/instances")[1]["instances"] == []


def test_registrations_survive_an_xdsd_restart(scene: Scene) -> None:
    scene.register("v3", ttl="60s", zone="zone-a", labels={"version": "v3"})
    wait_for(lambda: scene.has("v3"), "v3 in Envoy", 10)
    scene.xdsd.kill()
    scene.xdsd.start()
    instances = scene.api("/v1/instances")[1]["instances"]
    assert [(i["instance_id"], i["zone"], i["labels"]) for i in instances] == [("v3", "zone-a", {"version": "v3"})]
    wait_for(lambda: scene.xdsd.proxy("edge-1") is not None, "Envoy to reconnect", 30)
    assert scene.has("v3")
    assert any(r.app == "v3" for r in send_requests(scene.url, 20))


BAD = [
    ({"service": "nope"}, "service", "unknown service"),
    ({"port": 0}, "port", "must be 1..65535"),
    ({"port": 70000}, "port", "must be 1..65535"),
    ({"address": "not an address!"}, "address", "neither an IP address nor a host name"),
    ({"ttl": "0s"}, "ttl", "greater than 0"),
    ({"ttl": -1}, "ttl", "greater than 0"),
    ({"ttl": "soon"}, "ttl", "duration"),
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels", "at most 64 labels"),
    ({"weight": 0}, "weight", "must be 1..1000000"),
    ({"colour": "blue"}, "colour", "unknown field"),
]


@pytest.mark.parametrize("change, field, reason", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_registrations_are_refused_naming_the_field_and_change_nothing(scene: Scene, change: dict[str, Any], field: str, reason: str) -> None:
    revision = scene.xdsd.admin_get_json("/debug/config")["revision"]
    scene.register("v2", ttl="60s")
    # The registration becomes a revision after the registry debounce: wait for it, so that the
    # comparison below sees only what the bad registration did.
    wait_for(lambda: scene.xdsd.admin_get_json("/debug/config")["revision"] != revision, "v2's revision", 10)
    before = (scene.api("/v1/instances")[1], scene.xdsd.admin_get_json("/debug/config")["revision"])
    host, port = scene.ups.addresses["v3"]
    body = {"service": "reviews", "instance_id": "v3", "address": host, "port": port, **change}
    status, reply = scene.api("/v1/register", body, token=scene.xdsd.token("t", str(body["service"])))
    assert status == 400, reply
    assert any(e.startswith(f"{field}:") and reason in e for e in reply["errors"]), reply
    assert (scene.api("/v1/instances")[1], scene.xdsd.admin_get_json("/debug/config")["revision"]) == before


async def test_grpc_registration_api(scene: Scene) -> None:
    channel = scene.xdsd.channel()  # TLS when xdsd serves it
    stub = registration_pb2_grpc.RegistrationStub(channel)
    md = (("x-xdsd-token", scene.xdsd.token("t", "reviews")),)
    host, port = scene.ups.addresses["v2"]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Register(registration_pb2.RegisterRequest(service="reviews", instance_id="x", address=host, port=0), metadata=md)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "port:" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.Register(registration_pb2.RegisterRequest(service="reviews", instance_id="x", address=host, port=port))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.Register(registration_pb2.RegisterRequest(service="reviews", instance_id="x", address=host, port=port),
                                metadata=(("x-xdsd-token", scene.xdsd.token("t", "ratings")),))
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        req = registration_pb2.RegisterRequest(service="reviews", instance_id="v2", address=host, port=port, weight=2)
        req.ttl.FromSeconds(30)
        inst = await stub.Register(req, metadata=md)
        assert inst.state == registration_pb2.Instance.ACTIVE and inst.weight == 2
        wait_for(lambda: scene.endpoints().get(f"{host}:{port}") == 2, "v2 with weight 2 in Envoy", 10)
        await stub.Heartbeat(registration_pb2.HeartbeatRequest(service="reviews", instance_id="v2"), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as unlisted:
            await stub.List(registration_pb2.ListRequest(service="reviews"))
        assert unlisted.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.List(registration_pb2.ListRequest(service="reviews"), metadata=md)
        assert [i.instance_id for i in listed.instances] == ["v2"]
        drained = await stub.Deregister(registration_pb2.DeregisterRequest(service="reviews", instance_id="v2"), metadata=md)
        assert drained.state == registration_pb2.Instance.DRAINING
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Heartbeat(registration_pb2.HeartbeatRequest(service="reviews", instance_id="ghost"), metadata=md)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await channel.close()


def test_registration_needs_a_token_for_that_service(scene: Scene) -> None:
    host, port = scene.ups.addresses["v2"]
    body = {"service": "reviews", "instance_id": "v2", "address": host, "port": port}
    assert scene.api("/v1/register", body, token=None)[0] == 401
    assert scene.api("/v1/register", body, token="v1.e30.\xc3\xa9")[0] == 401  # the bytes of "é" on the wire
    assert scene.api("/v1/register", body, token=scene.xdsd.token("t", "ratings"))[0] == 403
    assert scene.api("/v1/instances", token=None)[0] == 401
    assert scene.api("/v1/instances")[1]["instances"] == []


# Bodies that once got a 500 and were stored anyway, breaking /v1/instances, every later
# registration and, after a restart, every xDS stream.
POISON = [
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"zone":"\\ud800"}',
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"labels":{"v":"\\udc80"}}',
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"labels":{"\\ud800":"v"}}',
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"instance_id":"a\\udbff"}',
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"ttl":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"weight":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"127.0.0.9","port":' + b"9" * 400 + b"}",
    b'{"service":"reviews","address":"127.0.0.9\\n","port":%d}',
    b'{"service":"reviews","address":"127.0.0.9","port":%d,"labels":' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
    b"[" * 1000 + b"]" * 1000,
    b"\xff\xfe",
]


def post(scene: Scene, path: str, raw: bytes, token: str | None) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token:
        headers["x-xdsd-token"] = token
    req = urllib.request.Request(f"http://127.0.0.1:{scene.xdsd.admin_port}{path}", data=raw, headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_poison_bodies_are_refused_and_registration_keeps_working_across_a_restart(scene: Scene) -> None:
    token = scene.xdsd.token("t", "reviews")
    for template in POISON:
        raw = template.replace(b"%d", str(scene.ups.addresses["v2"][1]).encode())
        status, body = post(scene, "/v1/register", raw, token)
        assert 400 <= status < 500, (raw[:100], status, body)
        assert body["errors"], body
    assert scene.api("/v1/instances") == (200, {"instances": []})
    assert scene.xdsd.http_status("/readyz") == 200
    scene.register("v2", ttl="60s", zone="zone-\u00e9", labels={"team": "caf\u00e9"})
    wait_for(lambda: scene.has("v2"), "v2 in Envoy after the poison bodies", 10)
    scene.xdsd.kill()
    scene.xdsd.start()
    assert [i["instance_id"] for i in scene.api("/v1/instances")[1]["instances"]] == ["v2"]
    assert scene.xdsd.http_status("/readyz") == 200
    wait_for(lambda: scene.xdsd.proxy("edge-1") is not None, "Envoy to reconnect", 30)
    wait_for(lambda: any(r.app == "v2" for r in send_requests(scene.url, 10)), "traffic on v2 after the restart", 15)


def test_a_registrations_file_poisoned_before_the_fix_loses_only_its_bad_entries(scene: Scene) -> None:
    host, port = scene.ups.addresses["v3"]
    good = {"service": "reviews", "instance_id": "v3", "address": host, "port": port, "weight": 1, "zone": None,
            "labels": {}, "ttl": 600.0, "state": "ACTIVE", "expires_at": time.time() + 600}
    bad = [{**good, "instance_id": "z", "port": port + 1, "zone": "\ud800"},
           {**good, "instance_id": "l", "port": port + 2, "labels": {"\udc80": "\udc80"}},
           {**good, "instance_id": "n", "address": "127.0.0.1\n"}]
    scene.xdsd.stop()
    (scene.xdsd.state_dir / "registrations.json").write_text(json.dumps({"instances": [good, *bad]}))
    scene.xdsd.start()
    assert [i["instance_id"] for i in scene.api("/v1/instances")[1]["instances"]] == ["v3"]
    wait_for(lambda: scene.xdsd.proxy("edge-1") is not None, "Envoy to reconnect", 30)
    wait_for(lambda: scene.has("v3"), "v3 in Envoy", 15)
    assert "dropped entry" in scene.xdsd.log_tail(400)


def test_another_service_cannot_squat_an_instances_address(scene: Scene) -> None:
    host, port = scene.ups.addresses["v2"]
    squat = {"service": "ratings", "instance_id": "squat", "address": host, "port": port}
    assert scene.api("/v1/register", squat, token=scene.xdsd.token("t", "ratings"))[0] == 200
    scene.register("v2", ttl="30s")  # the real instance: 200, not "already registered as ratings/squat"
    wait_for(lambda: scene.has("v2"), "v2 in Envoy", 10)
    status, body = scene.api("/v1/register", {"service": "reviews", "instance_id": "other", "address": host, "port": port})
    assert status == 400 and body["errors"][0].startswith(f"address: {host}:{port} is already registered as reviews/v2")
