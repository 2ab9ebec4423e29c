"""Several xdsd replicas on one real 3-member etcd cluster (on loopback), with real Envoys under
steady traffic: a registration through one replica is routed by Envoys on another; SIGKILL of a
replica moves its Envoys to another with no failed request and no new versions; one etcd member
down changes nothing, quorum lost freezes writes (503 naming etcd) but never serving, and everything
resumes when quorum returns; a replica cut off while etcd compacts lists again and converges; a
replica started while etcd is unreachable serves nothing; applies through two replicas conflict
instead of undoing each other; one address through two replicas at once is taken once, and a
listing shows the expiry heartbeats through another replica gave; history, rollback, revocations and
token key rotation are shared."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc
from google.protobuf import timestamp_pb2

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.etcd import EtcdCluster, etcd_cluster  # noqa: F401 - fixture
from tests.support.meshes import MeshFile, edge_mesh
from tests.support.procs import free_port, port_open, wait_for
from tests.support.traffic import SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import ROOT, XdsdProcess
from xdsd.api.v1 import registration_pb2, registration_pb2_grpc
from xdsd.store.etcd import EtcdClient
from xdsd.store.spec import StoreSpec, parse_endpoints


@pytest.fixture
def replicas(tmp_path: Path, mesh_file: MeshFile, etcd_cluster: EtcdCluster) -> Iterator[Callable[..., XdsdProcess]]:  # noqa: F811
    """Factory: ``replicas(name, wait_ready=True)`` starts ``xdsd serve --store etcd://...``."""
    started: list[XdsdProcess] = []

    def start(name: str, wait_ready: bool = True, store: str | None = None) -> XdsdProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        proc = XdsdProcess(mesh_file.path, workdir, name=name, log_level="info",
                           extra_args=["--store", store or etcd_cluster.store_url, "--drain-time", "2"])
        started.append(proc)
        return proc.start(wait_ready, timeout=60)

    yield start
    for proc in reversed(started):
        proc.stop()


def api(proc: XdsdProcess, path: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
    headers = {"content-type": "application/json",
               "x-xdsd-token": proc.token("test", str((body or {}).get("service", "reviews")))}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(proc.admin_url + path, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def apply(proc: XdsdProcess, content: bytes, query: str = "", path: str = "/v1/config/apply") -> tuple[int, Any]:
    """``xdsd apply``'s request: the mesh file's bytes (JSON is YAML) to /v1/config/apply."""
    req = urllib.request.Request(proc.admin_url + path + query, data=content, method="POST",
                                 headers={"x-xdsd-token": proc.operator_token()})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def register(proc: XdsdProcess, ups: Upstreams, name: str, ttl: str = "10s") -> tuple[int, Any]:
    host, port = ups.addresses[name]
    return api(proc, "/v1/register", {"service": "reviews", "instance_id": name, "address": host, "port": port,
                                      "ttl": ttl})


async def grpc_register(proc: XdsdProcess, ups: Upstreams, name: str) -> tuple[grpc.StatusCode, str]:
    """Register over gRPC (the xDS port): the status code and details."""
    host, port = ups.addresses[name]
    async with proc.channel() as channel:
        stub = registration_pb2_grpc.RegistrationStub(channel)
        try:
            await stub.Register(registration_pb2.RegisterRequest(service="reviews", instance_id=name, address=host, port=port),
                                metadata=[("x-xdsd-token", proc.token("test", "reviews"))], timeout=15)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def serves(url: str, app: str, n: int = 10) -> bool:
    return any(r.app == app for r in send_requests(url, n))


def on(proc: XdsdProcess, node_id: str) -> bool:
    return proc.running and proc.proxy(node_id) is not None


def versions(envoy: EnvoyProcess) -> dict[str, str]:
    """The version of each dynamic resource Envoy holds (clusters, listeners, routes, secrets)."""
    out: dict[str, str] = {}
    for config in envoy.config_dump()["configs"]:
        for key in ("dynamic_active_clusters", "dynamic_listeners", "dynamic_route_configs", "dynamic_active_secrets"):
            for item in config.get(key, []):
                state = item.get("active_state", item)
                name = (state.get("cluster") or state.get("listener") or state.get("route_config") or {}).get("name")
                out[f"{key}/{name or item.get('name')}"] = state.get("version_info", "")
    return out


def scene(mesh_file: MeshFile, upstreams: Callable[..., Upstreams]) -> tuple[Upstreams, str]:
    ups = upstreams({"v1": "127.0.0.2", "v2": "127.0.0.3", "v3": "127.0.0.4", "v4": "127.0.0.5"})
    gw = free_port()
    mesh_file.write(edge_mesh(gw, [ups.address("v1")]))
    return ups, f"http://127.0.0.1:{gw}/r"


def test_registration_through_one_replica_is_routed_by_envoys_on_another(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], record_property: Callable[[str, object], None]) -> None:
    ups, url = scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    envoy = envoy_factory(b, "edge-1", "edge")  # on b only
    wait_for(lambda: serves(url, "v1"), "traffic to the static endpoint", 30)
    t0 = time.monotonic()
    status, body = register(a, ups, "v2", ttl="2s")
    assert status == 200, body
    wait_for(lambda: serves(url, "v2"), "Envoy on b to route to the instance registered through a", 30)
    record_property("seconds_register_on_a_to_traffic_via_b", round(time.monotonic() - t0, 3))
    # Heartbeats through b keep the lease of a registration made through a alive past its TTL.
    for _ in range(8):
        assert api(b, "/v1/heartbeat", {"service": "reviews", "instance_id": "v2"})[0] == 200
        time.sleep(0.5)
    assert serves(url, "v2", 20)
    # Every replica lists both, and the proxy on b.
    listed = wait_for(lambda: (r := a.admin_get_json("/debug/replicas")) and len(r["replicas"]) == 2 and r,
                      "a to list both replicas", 15)
    by_xds = {x["xds_address"]: x for x in listed["replicas"]}
    wait_for(lambda: "edge-1" in {x["xds_address"]: x for x in a.admin_get_json("/debug/replicas")["replicas"]}
             [f"127.0.0.1:{b.xds_port}"]["proxies"], "a to show edge-1 on b", 15)
    assert set(by_xds) == {f"127.0.0.1:{a.xds_port}", f"127.0.0.1:{b.xds_port}"}
    # The instance goes everywhere when its heartbeats stop (its lease ends).
    wait_for(lambda: not serves(url, "v2", 20), "the instance to leave when its lease ends", 30)
    assert envoy.running


def test_sigkill_of_a_replica_moves_its_envoys_without_a_failed_request(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], record_property: Callable[[str, object], None],
        etcd_cluster: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    ups, url = scene(mesh_file, upstreams)

    def with_sidecar(mesh: dict[str, Any]) -> None:  # the gateway gets an SVID (SDS) to call it over mTLS
        mesh["services"]["ratings"] = {"sidecar": {"inbound": {"address": "127.0.0.9", "port": 15006}, "app_port": 9080}}
        mesh["gateways"]["edge"]["routes"].insert(0, {"prefix": "/ratings", "service": "ratings"})

    mesh_file.update(with_sidecar)
    a, b = replicas("a"), replicas("b")
    # The bootstrap as an operator makes it on another machine: `xdsd bootstrap --store etcd://...`
    # with an empty state dir mints the token with the shared key and embeds the shared CA.
    made = subprocess.run([sys.executable, "-m", "xdsd", "bootstrap", "--node-id", "edge-1", "--cluster", "edge",
                           "--xds-address", f"127.0.0.1:{a.xds_port}", "--xds-address", f"127.0.0.1:{b.xds_port}",
                           "--admin-port", str(free_port()), "--format", "json", "--store", etcd_cluster.store_url,
                           "--state-dir", str(tmp_path / "operator")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    envoy = envoy_factory.from_bootstrap("edge-1", json.loads(made.stdout))
    wait_for(lambda: serves(url, "v1"), "traffic to the static endpoint", 30)
    victim = wait_for(lambda: a if on(a, "edge-1") else b if on(b, "edge-1") else None, "edge-1 on a replica", 30)
    survivor = b if victim is a else a
    before = wait_for(lambda: (v := versions(envoy)) and all(v.values()) and v, "Envoy to hold versions", 30)
    assert any(k.startswith("dynamic_active_secrets/") for k in before), before  # the same SVID from either replica
    with SteadyTraffic(url, interval=0.01) as traffic:
        time.sleep(0.5)
        killed = time.monotonic()
        victim.kill()
        wait_for(lambda: on(survivor, "edge-1"), "edge-1 to reconnect to the surviving replica", 30)
        record_property("seconds_sigkill_to_envoy_on_other_replica", round(time.monotonic() - killed, 3))
        # Same content-hash versions from the other replica: nothing new was pushed.
        wait_for(lambda: survivor.proxy("edge-1")["types"] and all(  # type: ignore[index]
            t.get("acked_version") for t in survivor.proxy("edge-1")["types"].values()), "the survivor's ACKs", 15)  # type: ignore[index]
        assert versions(envoy) == before
        # And the new stream carries changes: a registration through the survivor is routed.
        status, body = register(survivor, ups, "v2")
        assert status == 200, body
        wait_for(lambda: any(r.app == "v2" for r in list(traffic.results)[-50:]), "traffic to v2 after failover", 30)
    traffic.assert_no_failures(min_requests=50)


def test_quorum_lost_freezes_writes_never_serving_and_resumes(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    ups, url = scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    envoy_factory(b, "edge-1", "edge")
    assert register(a, ups, "v2", ttl="2s")[0] == 200
    wait_for(lambda: serves(url, "v2"), "traffic to v2", 30)
    beats: list[int] = []
    stop = threading.Event()

    def heartbeat() -> None:  # the instance's agent, through replica a
        while not stop.is_set():
            try:
                beats.append(api(a, "/v1/heartbeat", {"service": "reviews", "instance_id": "v2"}, timeout=10)[0])
            except OSError:
                beats.append(0)
            stop.wait(0.5)

    agent = threading.Thread(target=heartbeat, daemon=True)
    agent.start()
    try:
        with SteadyTraffic(url, interval=0.02) as traffic:
            m0, m1, m2 = etcd_cluster.members
            # One member down: nothing changes.
            etcd_cluster.stop_member(m0)
            status, body = wait_for(lambda: (r := register(b, ups, "v3")) and r[0] == 200 and r, "register with one member down", 30)
            wait_for(lambda: serves(url, "v3"), "traffic to v3", 30)
            # Quorum lost: writes answer 503 naming etcd; serving goes on; nobody is dropped.
            etcd_cluster.stop_member(m1)
            status, body = register(a, ups, "v4")
            assert status == 503 and "etcd" in " ".join(body["errors"]), body
            code, details = asyncio.run(grpc_register(b, ups, "v4"))
            assert code == grpc.StatusCode.UNAVAILABLE and "etcd" in details, (code, details)
            changed = mesh_file.read()
            changed["services"]["ratings"] = {}
            status, body = apply(b, json.dumps(changed).encode())
            assert status == 503 and "etcd" in " ".join(body["errors"]), body
            lost = len(beats)
            wait_for(lambda: 503 in beats[lost:], "a heartbeat refused while quorum is lost", 30)
            for replica in (a, b):
                assert replica.http_status("/readyz") == 200, replica.admin_get("/readyz")
            time.sleep(5)  # more than twice v2's TTL without a stored heartbeat
            assert serves(url, "v2", 20) and serves(url, "v3", 20)
            # Quorum back: everything resumes without a restart.
            etcd_cluster.start_member(m0)
            etcd_cluster.start_member(m1)
            wait_for(lambda: register(a, ups, "v4")[0] == 200, "registration through a after quorum returns", 60)
            back = len(beats)
            wait_for(lambda: beats[back:].count(200) >= 2, "heartbeats stored again", 30)
            assert serves(url, "v2", 20)
        traffic.assert_no_failures(min_requests=50)
    finally:
        stop.set()
        agent.join(15)


def test_a_replica_started_while_etcd_is_unreachable_serves_nothing_until_it_is_back(
        replicas: Callable[..., XdsdProcess], mesh_file: MeshFile, upstreams: Callable[..., Upstreams],
        etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    scene(mesh_file, upstreams)
    etcd_cluster.stop()
    r = replicas("r", wait_ready=False)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert not port_open("127.0.0.1", r.xds_port), "the xDS port opened without etcd"
        try:
            assert r.http_status("/readyz", timeout=1) != 200
        except OSError:
            pass  # not even listening: not ready
        assert r.running, r.log_tail()
        time.sleep(0.2)
    assert "etcd" in r.log_tail(), r.log_tail()
    for m in etcd_cluster.members:
        etcd_cluster.start_member(m)
    r.wait_ready(60)
    assert port_open("127.0.0.1", r.xds_port)


def test_concurrent_applies_through_two_replicas_one_gets_a_conflict(
        replicas: Callable[..., XdsdProcess], mesh_file: MeshFile, upstreams: Callable[..., Upstreams],
        etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    first, second = mesh_file.read(), mesh_file.read()
    first["services"]["ratings"] = {}
    second["services"]["details"] = {}
    status, diffed = apply(a, json.dumps(second).encode(), path="/v1/config/diff")  # what `xdsd apply` does first
    assert status == 200 and diffed["base"] > 0, diffed
    status, out = apply(b, json.dumps(first).encode())  # another operator, through b, comes first
    assert status == 200 and out["result"] == "applied", out
    status, out = apply(a, json.dumps(second).encode(), f"?base={diffed['base']}")
    assert status == 409 and out["result"] == "conflict" and "another apply came first" in out["errors"][0], out
    # Both replicas serve the first one; `xdsd status` lists both replicas.
    for replica in (a, b):
        wait_for(lambda r=replica: "ratings" in r.admin_get("/debug/config") or
                 r.admin_get_json("/debug/config")["summary"].startswith("2 services"), "the applied mesh", 15)
    # One history, numbered by etcd revision, on every replica; a rollback through a reaches b.
    history = a.admin_get_json("/v1/config/history")
    assert [e["how"] for e in history["revisions"]] == ["seed", "apply"], history
    assert b.admin_get_json("/v1/config/history") == history and history["current"] == history["revisions"][-1]["revision"]
    status, out = apply(a, b"", path="/v1/config/rollback")
    assert status == 200 and out["result"] == "applied" and out["to"] == history["revisions"][0]["revision"], out
    seeded = history["revisions"][0]["summary"]
    wait_for(lambda: all(r.admin_get_json("/debug/config")["summary"] == seeded for r in (a, b)) and
             "rollback" in b.admin_get_json("/v1/config/history")["revisions"][-1]["how"], "both to serve the rollback", 15)
    wait_for(lambda: len(a.admin_get_json("/debug/replicas")["replicas"]) == 2, "both replicas listed", 15)
    shown = subprocess.run([sys.executable, "-m", "xdsd", "status", "--admin-address", f"127.0.0.1:{a.admin_port}",
                            "--state-dir", str(a.state_dir)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert f"xds 127.0.0.1:{a.xds_port}" in shown.stdout and f"xds 127.0.0.1:{b.xds_port}" in shown.stdout, shown.stdout


def test_a_revocation_through_etcd_ends_the_streams_on_every_replica(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], etcd_cluster: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    envoy_factory(b, "edge-1", "edge")
    wait_for(lambda: on(b, "edge-1"), "edge-1 on b", 30)
    done = subprocess.run([sys.executable, "-m", "xdsd", "token", "revoke", "--node-id", "edge-1",
                           "--store", etcd_cluster.store_url, "--state-dir", str(tmp_path / "operator")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "revoked" in done.stdout, done.stderr
    wait_for(lambda: any(r.get("node_id") == "edge-1" for r in b.admin_get_json("/debug/refused")),
             "b to refuse edge-1's revoked token", 30)
    assert not on(b, "edge-1")
    assert "edge-1" in a.state_dir.joinpath("tokens", "revoked.json").read_text()  # every replica has the list


def test_registration_rules_that_compare_instances_hold_across_replicas(
        replicas: Callable[..., XdsdProcess], mesh_file: MeshFile, upstreams: Callable[..., Upstreams]) -> None:
    scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    # One address through two replicas at once, a few times: exactly one taken each time, the other
    # refused with the 400 naming the address a single replica gives.
    for n in range(3):
        answers: list[tuple[int, Any]] = []
        bodies = [{"service": "reviews", "instance_id": f"{who}{n}", "address": "127.0.0.9", "port": 7000 + n,
                   "ttl": "10s"} for who in ("a", "b")]
        threads = [threading.Thread(target=lambda p=p, body=body, out=answers: out.append(api(p, "/v1/register", body)))
                   for p, body in zip((a, b), bodies, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(code for code, _ in answers) == [200, 400], answers
        refused = next(body for code, body in answers if code == 400)
        assert refused["errors"][0].startswith(f"address: 127.0.0.9:{7000 + n} is already registered as reviews/")
    # Heartbeats through a refresh the lease only; b's listing answers the lease's expiry.
    code, first = api(a, "/v1/register", {"service": "reviews", "instance_id": "hb", "address": "127.0.0.10",
                                          "port": 7100, "ttl": "3s"})
    assert code == 200
    for _ in range(6):
        assert api(a, "/v1/heartbeat", {"service": "reviews", "instance_id": "hb"})[0] == 200
        time.sleep(0.5)
    assert api(a, "/v1/heartbeat", {"service": "reviews", "instance_id": "hb"})[0] == 200

    def seconds(text: str) -> float:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(text)
        return float(stamp.ToNanoseconds()) / 1e9

    listed = api(b, "/v1/instances?service=reviews")[1]["instances"]
    seen = seconds(next(i["expires_at"] for i in listed if i["instance_id"] == "hb"))
    assert seen >= seconds(first["expires_at"]) + 2, (seen, first["expires_at"])


def listing_status(proc: XdsdProcess, token: str) -> int:
    """GET /v1/instances with ``token``: 200, or 401 for a token this replica does not accept."""
    req = urllib.request.Request(proc.admin_url + "/v1/instances", headers={"x-xdsd-token": token})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_token_key_rotation_and_retirement_through_etcd_reach_every_replica(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], etcd_cluster: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    from xdsd.auth.commands import mint

    scene(mesh_file, upstreams)
    a, b = replicas("a"), replicas("b")
    old = a.token("test", "reviews")  # the shared key's (a's copy of it)
    envoy_factory(b, "edge-1", "edge")  # its bootstrap token too
    wait_for(lambda: on(b, "edge-1"), "edge-1 on b", 30)
    operator = tmp_path / "operator"

    def token(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xdsd", "token", *args, "--store", etcd_cluster.store_url,
                               "--state-dir", str(operator)], capture_output=True, text=True, timeout=60, cwd=ROOT)

    done = token("rotate-key")
    assert done.returncode == 0 and "new signing key" in done.stdout, done.stderr
    new = mint(operator, "test", "reviews", ttl=600)[0]  # with the new key (the command copied it)
    wait_for(lambda: listing_status(a, new) == listing_status(b, new) == 200, "every replica to accept the new key", 30)
    assert listing_status(a, old) == listing_status(b, old) == 200  # the old key still verifies
    assert on(b, "edge-1")
    assert a.state_dir.joinpath("token.key").read_bytes() == operator.joinpath("token.key").read_bytes()
    done = token("retire-key")
    assert done.returncode == 0 and "retired key(s)" in done.stdout, done.stderr
    wait_for(lambda: listing_status(a, old) == listing_status(b, old) == 401, "every replica to refuse the old key", 30)
    wait_for(lambda: any(r.get("node_id") == "edge-1" for r in b.admin_get_json("/debug/refused")),
             "b to end edge-1's stream (its token's key is retired)", 30)
    assert listing_status(a, new) == listing_status(b, new) == 200
    done = token("retire-key")  # the current key is never retired
    assert done.returncode == 1 and "no previous key" in done.stderr


async def _compact(cluster: EtcdCluster) -> int:
    """Compact etcd at its current revision (as `etcdctl compact` does)."""
    client = EtcdClient(StoreSpec("etcd", parse_endpoints(cluster.store_url)))
    try:
        revision, _ = await client.list(b"/xdsd/")
        await client._call(rpc.KVStub, "Compact", rpc.CompactionRequest(revision=revision, physical=True))
        return revision
    finally:
        await client.close()


def test_a_replica_cut_off_while_etcd_compacts_lists_again_and_converges(
        replicas: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory, mesh_file: MeshFile,
        upstreams: Callable[..., Upstreams], etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    ups, url = scene(mesh_file, upstreams)
    m0, m1, m2 = etcd_cluster.members
    a = replicas("a")
    c = replicas("c", store=f"etcd://127.0.0.1:{m2.client_port}")  # reaches etcd through m2 only
    envoy_factory(c, "edge-1", "edge")
    assert register(a, ups, "v2")[0] == 200
    wait_for(lambda: serves(url, "v2"), "the Envoy on c to route to v2", 30)
    with SteadyTraffic(url, interval=0.02) as traffic:
        etcd_cluster.stop_member(m2)  # c is cut off: it keeps serving what it has
        assert register(a, ups, "v3")[0] == 200
        assert api(a, "/v1/deregister", {"service": "reviews", "instance_id": "v2"})[0] == 200
        wait_for(lambda: all(x["instance_id"] != "v2" for x in api(a, "/v1/instances")[1]["instances"]),
                 "v2 drained", 30)
        compacted = asyncio.run(_compact(etcd_cluster))  # past every revision c has seen
        assert serves(url, "v2", 20)  # c still serves its last state
        etcd_cluster.start_member(m2)
        wait_for(lambda: c.admin_get_json("/debug/replicas")["sync"]["relists"] >= 1, "c to list again", 60)
        wait_for(lambda: serves(url, "v3", 20) and not serves(url, "v2", 30), "c to converge", 30)
        assert c.admin_get_json("/debug/replicas")["sync"]["revision"] >= compacted
    traffic.assert_no_failures(min_requests=50)
