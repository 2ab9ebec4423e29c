"""`xdsd serve` options the README promises, each against a real xdsd: nothing is served before a
valid config; --debounce and --registry-debounce make bursts one revision; --auth off lets every
caller in; --ca-cert/--ca-key/--ca-bundle make an operator's CA issue the SVIDs Envoy gets."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.support.certs import operator_ca
from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import MeshFile, edge_mesh, sidecar_mesh
from tests.support.ports import port_open
from tests.support.procs import free_port, free_port_on, wait_for
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xds_client import XdsClient
from tests.support.xdsd_proc import XdsdProcess
from xdsd import typeurls


def test_nothing_is_served_until_a_valid_config_is_loaded(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
        upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    gw = free_port()
    mesh_file.write(edge_mesh(gw, [(ups.address("web")[0], 0)]))  # port 0: invalid
    server = xdsd(wait_ready=False)
    server.wait_for(lambda: server.http_status("/readyz") == 503, "/readyz to answer 503", 30)
    assert server.admin_get_json("/readyz")["reason"] == "no valid config loaded yet"
    assert server.metric_value("xdsd_ready") == 0
    # A gateway connects and asks; it is answered nothing, so it opens no port.
    envoy = envoy_factory(server, "edge-1", "edge", wait_live=False)
    proxy = server.wait_for(lambda: server.proxy("edge-1"), "the gateway to connect", 30)
    assert proxy["types"] and {t["state"] for t in proxy["types"].values()} == {"NOT SENT"}, proxy
    envoy.wait_for(lambda: envoy.listener_names() == set(), "Envoy's admin to answer", 30)
    assert not port_open("127.0.0.1", gw)
    # The first valid config is served.
    mesh_file.write(edge_mesh(gw, [ups.address("web")]))
    server.wait_ready()
    assert server.metric_value("xdsd_ready") == 1
    wait_for(lambda: send_requests(f"http://127.0.0.1:{gw}/", 1)[0].app == "web", "the gateway to route", 30)


def _weights(resp: discovery_pb2.DiscoveryResponse) -> dict[str, int]:
    out: dict[str, int] = {}
    for any_ in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_.Unpack(cla)
        for locality in cla.endpoints:
            for lb in locality.lb_endpoints:
                sock = lb.endpoint.address.socket_address
                out[f"{sock.address}:{sock.port_value}"] = lb.load_balancing_weight.value
    return out


async def _eds_client(server: XdsdProcess, channel: grpc.aio.Channel) -> XdsClient:
    """A gateway's stream, subscribed to reviews' endpoints, its first answer ACKed."""
    client = XdsClient(channel, "edge-1", "edge", metadata=[("x-xdsd-token", server.token("edge-1", "edge"))])
    await client.request(typeurls.ENDPOINT, ["reviews"])
    await client.ack(await client.recv(10), ["reviews"])
    return client


async def test_debounce_makes_a_burst_of_edits_one_revision(mesh_file: MeshFile,
                                                            xdsd: Callable[..., XdsdProcess]) -> None:
    """Five edits 0.1 s apart, each a finished write: with --debounce 2 (the file unchanged for 2 s),
    xdsd takes only the last one: one new revision, and the first push carries the last weight."""
    gw = free_port()
    mesh_file.write(edge_mesh(gw, [("10.0.0.1", 80, 1)]))
    server = xdsd(extra_args=["--debounce", "2"])
    revisions = len(server.admin_get_json("/v1/config/history")["revisions"])
    async with server.channel() as channel:
        client = await _eds_client(server, channel)
        try:
            for weight in range(2, 7):
                mesh_file.write(edge_mesh(gw, [("10.0.0.1", 80, weight)]))
                await asyncio.sleep(0.1)  # the burst: well inside the quiet period
            assert _weights(await client.recv(30)) == {"10.0.0.1:80": 6}
        finally:
            await client.close()
    history = server.admin_get_json("/v1/config/history")["revisions"]
    assert len(history) == revisions + 1, history


async def test_registry_debounce_makes_a_burst_of_registrations_one_revision(
        mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess]) -> None:
    """Five instances registered together: with --registry-debounce 2 they are one revision, and the
    first push after them carries all five."""
    mesh_file.write(edge_mesh(free_port(), [("10.0.0.1", 80)]))
    server = xdsd(extra_args=["--registry-debounce", "2"])
    before = server.metric_value("xdsd_config_revision")
    token = server.token("vm", "reviews")
    async with server.channel() as channel:
        client = await _eds_client(server, channel)
        try:
            for i in range(5):
                status, body = _register(server, token, {"service": "reviews", "address": f"10.0.1.{i + 1}", "port": 80,
                                                         "ttl": "60s"})
                assert status == 200, body
            pushed = _weights(await client.recv(30))
        finally:
            await client.close()
    assert set(pushed) == {"10.0.0.1:80", *(f"10.0.1.{i + 1}:80" for i in range(5))}
    assert server.metric_value("xdsd_config_revision") == before + 1


def _register(server: XdsdProcess, token: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json", **({"x-xdsd-token": token} if token else {})}
    req = urllib.request.Request(f"{server.admin_url}/v1/register", data=json.dumps(body).encode(), method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_auth_off_lets_every_caller_in(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
                                             envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams]) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    gw = free_port()
    mesh_file.write(edge_mesh(gw, [ups.address("web")]))
    server = xdsd(extra_args=["--auth", "off"])
    assert "--auth off" in server.log_tail(200)  # said out loud
    envoy_factory(server, "edge-1", "edge", token=None)  # a bootstrap without a token
    wait_for(lambda: send_requests(f"http://127.0.0.1:{gw}/", 1)[0].app == "web", "the tokenless gateway to route", 30)
    status, body = _register(server, None, {"service": "reviews", "address": "10.0.9.9", "port": 80})
    assert status == 200, body
    async with server.channel() as channel:  # CSDS, without an operator token
        answer = await csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(
            csds_pb2.ClientStatusRequest(), timeout=10)
    assert [c.node.id for c in answer.config] == ["edge-1"]


def _secret_certs(envoy: EnvoyProcess) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(the node's own certificate chain, its trust bundle) as Envoy holds them from SDS."""
    own: list[x509.Certificate] = []
    trusted: list[x509.Certificate] = []
    for entry in envoy.config_dump("dynamic_active_secrets")["configs"]:
        secret = entry["secret"]
        if "tls_certificate" in secret:
            own = x509.load_pem_x509_certificates(base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"]))
        elif "validation_context" in secret:
            trusted = x509.load_pem_x509_certificates(base64.b64decode(secret["validation_context"]["trusted_ca"]["inline_bytes"]))
    return own, trusted


def test_an_operator_ca_issues_the_svids(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
                                        envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams],
                                        tmp_path: Path) -> None:
    """`serve --ca-cert/--ca-key/--ca-bundle` with an intermediate under an operator's root: the
    sidecars' SVIDs (and xdsd's serving certificate) come from the intermediate, the trust bundle is
    the root, mTLS between the sidecars works with them, and xdsd makes no CA of its own."""
    ca = operator_ca(tmp_path / "operator-ca")
    ups = upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3"})
    out = free_port()
    mesh_file.write(sidecar_mesh(ups, free_port_on("127.0.0.2", "127.0.0.3"), {"productpage": {"reviews": out}},
                                 services=("productpage", "reviews")))
    server = xdsd(extra_args=ca.serve_args())
    assert x509.load_pem_x509_certificates(server.ca_bundle()) == [ca.root]
    envoys = {name: envoy_factory(server, f"{name}-1", name) for name in ("productpage", "reviews")}
    wait_for(lambda: send_requests(f"http://127.0.0.1:{out}/r", 1)[0].app == "reviews", "productpage -> reviews", 30)
    for name, envoy in envoys.items():
        own, trusted = _secret_certs(envoy)
        own[0].verify_directly_issued_by(ca.intermediate)  # raises unless the intermediate signed it
        assert own[1:] == [ca.intermediate], name  # the chain up to the root, for the peer to verify
        assert trusted == [ca.root], name
    assert not (server.state_dir / "ca").exists()
