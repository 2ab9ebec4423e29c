"""VM registration with a real Envoy: instances join with one call (or `xdsd register`), leave when
their heartbeats lapse or when they deregister (draining first), and survive an xdsd restart."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import ADS_MODES, MODES, MeshFile, Mode, edge_mesh, mode_ids
from tests.support.procs import Proc, free_port, wait_for
from tests.support.traffic import SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import ROOT, XdsdProcess
from xdsd.api.v1 import registration_pb2, registration_pb2_grpc


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
        return admin_api(self.xdsd, path, body, token)

    def register(self, name: str, ttl: str = "10s", **extra: Any) -> dict[str, Any]:
        host, port = self.ups.addresses[name]
        status, body = self.api("/v1/register", {"service": "reviews", "instance_id": name, "address": host,
                                                 "port": port, "ttl": ttl, **extra})
        assert status == 200, body
        return body

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        listed = self.api("/v1/instances?service=reviews")[1]["instances"]
        return next((i for i in listed if i["instance_id"] == instance_id), None)

    def endpoints(self) -> dict[str, int]:
        return self.envoy.endpoints_of("reviews")

    def has(self, name: str) -> bool:
        return "%s:%d" % self.ups.addresses[name] in self.endpoints()


def admin_api(proc: XdsdProcess, path: str, body: dict[str, Any] | None = None,
              token: str | None = "") -> tuple[int, dict[str, Any]]:
    """The registration API on xdsd's admin port; ``token`` "" mints one for the body's service."""
    headers = {"content-type": "application/json"}
    if token == "":
        token = proc.token("test", str((body or {}).get("service", "reviews")))
    if token:
        headers["x-xdsd-token"] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{proc.admin_url}{path}", data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _expires(instance: dict[str, Any] | None) -> dt.datetime:
    assert instance is not None
    return dt.datetime.fromisoformat(instance["expires_at"])


def register_agent(proc: XdsdProcess, workdir: Path, service: str, host: str, port: int, ttl: str) -> Proc:
    """``xdsd register`` as a VM runs it next to its app (minting its token from the state dir)."""
    return Proc("xdsd register", [
        sys.executable, "-m", "xdsd", "register", "--service", service, "--address", host, "--port", str(port),
        "--ttl", ttl, "--admin-address", f"127.0.0.1:{proc.admin_port}", "--state-dir", str(proc.state_dir),
    ], workdir / "xdsd-register" / "register.log", cwd=ROOT).start()


@pytest.fixture
def scene(request: pytest.FixtureRequest, mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
          envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams]) -> Scene:
    mode: Mode = getattr(request, "param", MODES[0])
    ups = upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3", "v3": "127.0.0.4"})
    gw = free_port()
    mesh = edge_mesh(gw, [ups.address("v1")])
    mesh["services"]["ratings"] = {}
    mesh_file.write(mesh)
    server = xdsd(extra_args=["--drain-time", "5"])
    envoy = envoy_factory(server, "edge-1", "edge", mode=mode)
    s = Scene(ups, server, envoy, gw)
    wait_for(lambda: send_requests(s.url, 1)[0].app == "v1", "traffic to the static endpoint", 30)
    return s


@pytest.mark.parametrize("scene", ADS_MODES, ids=mode_ids(ADS_MODES), indirect=True)
def test_xdsd_register_joins_heartbeats_and_drains_on_sigterm(scene: Scene, tmp_path: Path,
                                                              record_property: Callable[[str, object], None]) -> None:
    host, port = scene.ups.addresses["v2"]
    t0 = time.monotonic()
    agent = register_agent(scene.xdsd, tmp_path, "reviews", host, port, ttl="1s")
    try:
        wait_for(lambda: any(r.app == "v2" for r in send_requests(scene.url, 10)), "traffic on the registered instance", 30)
        record_property("seconds_from_register_to_traffic", round(time.monotonic() - t0, 3))
        # Heartbeats keep it well past its TTL (1 s): its expiry moves on by more than two TTLs.
        first = _expires(scene.instance(f"{host}:{port}"))
        wait_for(lambda: _expires(scene.instance(f"{host}:{port}")) > first + dt.timedelta(seconds=2),
                 "heartbeats to extend the registration", 15)
        assert scene.has("v2")
        # A slow request reaches v2 before the agent is stopped, and is answered (200) after xdsd
        # shows v2 DRAINING (the request takes 3 s, draining 5 s): in-flight requests finish while
        # an instance drains. No request fails while v2 drains and goes.
        scene.ups.set("v2", latency_ms=3000)
        reached = scene.ups.stats("v2")
        with SteadyTraffic(scene.url, interval=0.01) as traffic:
            wait_for(lambda: scene.ups.stats("v2") > reached, "a request in flight on v2", 15)
            in_flight = len(traffic.results)  # the client is sequential: its next result is that request
            agent.stop()
            assert agent.returncode == 0, agent.log_tail()
            wait_for(lambda: (scene.instance(f"{host}:{port}") or {}).get("state") == "DRAINING",
                     "the instance to be DRAINING", 5)
            draining_seen = time.monotonic()
            wait_for(lambda: len(traffic.results) > in_flight, "the in-flight request to complete", 15)
            wait_for(lambda: not scene.has("v2"), "v2 removed after draining", 15)
        slow = traffic.results[in_flight]
        assert (slow.status, slow.app) == (200, "v2") and slow.at > draining_seen, (slow, draining_seen)
        assert traffic.failures() == []
        out = agent.log_text()
        assert "registered reviews/" in out and "deregistered" in out
    finally:
        agent.stop()


@pytest.mark.parametrize("scene", ADS_MODES, ids=mode_ids(ADS_MODES), indirect=True)
def test_a_lapsed_instance_leaves_without_failures(scene: Scene) -> None:
    """An instance that stops heart-beating leaves Envoy, and no request fails meanwhile. (When, to
    the 100 ms sweep, is tests/unit/test_registry_expiry.py's, with a clock the test controls.)"""
    with SteadyTraffic(scene.url, interval=0.01) as traffic:
        # Heart-beat until Envoy has it (however long that takes here), then stop.
        wait_for(lambda: scene.register("v2", ttl="2s") and scene.has("v2"), "v2 in Envoy", 30)
        wait_for(lambda: not scene.has("v2"), "v2 to leave Envoy once its TTL lapsed", 30)
    assert traffic.failures() == []
    assert scene.api("/v1/instances")[1]["instances"] == []


def test_xdsd_register_registers_again_when_xdsd_lost_it(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
                                                         tmp_path: Path) -> None:
    """A crash can lose the last registrations (they are written at most every 0.1 s): the agent's
    next heartbeat gets a 404, and it registers again."""
    mesh_file.write({"services": {"reviews": {}}})
    server = xdsd()
    agent = register_agent(server, tmp_path, "reviews", "127.0.0.9", 8080, ttl="1s")
    try:
        def listed() -> list[str]:
            return [i["instance_id"] for i in admin_api(server, "/v1/instances?service=reviews")[1]["instances"]]

        wait_for(lambda: listed() == ["127.0.0.9:8080"], "the agent's registration", 15)
        server.kill()
        (server.state_dir / "registrations.json").unlink()  # what a crash before the write loses
        server.start()
        # The file is gone: a registration now is one the agent made since the restart.
        server.wait_for(lambda: listed() == ["127.0.0.9:8080"], "the agent to register again", 15)
        assert agent.running
    finally:
        agent.stop()


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
    req = urllib.request.Request(f"{scene.xdsd.admin_url}{path}", data=raw, headers=headers, method="POST")
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
