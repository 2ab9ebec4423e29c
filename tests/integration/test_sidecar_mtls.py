"""The sidecar mesh with real Envoys: app A -> sidecar A -> (mTLS) -> sidecar B -> app B, with
SVIDs issued by xdsd's CA and delivered over SDS, and node tokens guarding the xDS port.

Each "machine" is a loopback address: productpage on 127.0.0.2, reviews on 127.0.0.3, ratings on
127.0.0.4. An app binds its machine's address; its sidecar's inbound listener binds the same address
on the mesh port; outbound listeners bind 127.0.0.1 (so each sidecar gets its own outbound ports).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.certs import server_cert, write_svid
from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import ADS, ADS_MODES, MODES, MeshFile, Mode, mode_ids, sidecar_mesh
from tests.support.procs import free_port, free_port_on, wait_for
from tests.support.traffic import Client, SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.ca import CertificateAuthority

TD = "example.org"
SERVICES = {"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"}


@dataclass
class Mesh:
    ups: Upstreams
    xdsd: XdsdProcess
    mesh_file: MeshFile
    inbound_port: int
    out_port: int  # productpage's outbound port for reviews
    envoys: dict[str, EnvoyProcess]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.out_port}/reviews/1"


def mesh_dict(ups: Upstreams, inbound_port: int, out_port: int, lifetime: str = "1h",
              reviews_endpoint: str | None = None) -> dict[str, object]:
    """productpage -> reviews, and ratings, each with a sidecar; ``reviews_endpoint`` points reviews'
    one endpoint at another machine's inbound listener."""
    mesh = sidecar_mesh(ups, inbound_port, {"productpage": {"reviews": out_port}}, trust_domain=TD,
                        cert_lifetime=lifetime)
    if reviews_endpoint:
        mesh["services"]["reviews"]["endpoints"] = [{"address": reviews_endpoint, "port": inbound_port}]
    return mesh


@pytest.fixture
def make_mesh(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
              upstreams: Callable[..., Upstreams]) -> Callable[..., Mesh]:
    def make(mode: Mode, lifetime: str = "1h", reviews_endpoint: str | None = None,
             sidecars: tuple[str, ...] = ("productpage", "reviews")) -> Mesh:
        ups = upstreams(SERVICES)
        inbound_port = free_port_on(*SERVICES.values())
        out_port = free_port()
        mesh_file.write(mesh_dict(ups, inbound_port, out_port, lifetime, reviews_endpoint))
        server = xdsd()
        envoys = {name: envoy_factory(server, f"{name}-1", name, mode=mode) for name in sidecars}
        return Mesh(ups, server, mesh_file, inbound_port, out_port, envoys)

    return make


def served_by_reviews(m: Mesh) -> bool:
    return send_requests(m.url, 1)[0].app == "reviews"


@pytest.mark.parametrize("mode", MODES, ids=mode_ids(MODES))
def test_app_to_app_over_mtls_carries_the_callers_identity(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    m = make_mesh(mode)
    wait_for(lambda: served_by_reviews(m), "productpage -> reviews through both sidecars", 30)
    client = Client(m.url)
    conn_result = client.get()
    assert conn_result.status == 200
    # The reviews app sees who called: the SPIFFE ID from productpage's client certificate.
    conn = http.client.HTTPConnection("127.0.0.1", m.out_port, timeout=5)
    conn.request("GET", "/reviews/1")
    body = json.loads(conn.getresponse().read())
    xfcc = {k.lower(): v for k, v in body["headers"].items()}["x-forwarded-client-cert"]
    assert f"URI=spiffe://{TD}/service/productpage" in xfcc
    # The hop between sidecars was TLS: reviews' inbound listener completed handshakes.
    reviews = m.envoys["reviews"]
    assert reviews.stat(f"listener.127.0.0.3_{m.inbound_port}.ssl.handshake") >= 1
    # And each sidecar holds only its own identity's key, from SDS.
    secrets = m.envoys["productpage"].config_dump("dynamic_active_secrets")
    names = sorted(c["name"] for c in secrets["configs"])
    assert names == [f"spiffe://{TD}", f"spiffe://{TD}/service/productpage"]


def _tls_get(host: str, port: int, cert: Path | None = None, key: Path | None = None) -> int:
    """A raw TLS client; returns the HTTP status, or raises if the handshake or request fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET /reviews/1 HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    if not data:
        raise ConnectionError("connection closed without a response")
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("mode", ADS_MODES, ids=mode_ids(ADS_MODES))
def test_plaintext_and_foreign_ca_clients_cannot_reach_the_inbound_port(
    make_mesh: Callable[..., Mesh], mode: Mode, tmp_path: Path
) -> None:
    m = make_mesh(mode)
    wait_for(lambda: served_by_reviews(m), "the mesh to work", 30)
    # Plaintext straight at reviews' inbound port: no HTTP answer.
    plain = send_requests(f"http://127.0.0.3:{m.inbound_port}/reviews/1", 3)
    assert all(r.status == 0 for r in plain), plain
    # A client with a certificate (for a mesh identity!) from another CA: refused.
    foreign_dir = tmp_path / "foreign"
    foreign = CertificateAuthority.load_or_create(foreign_dir, TD)
    cert, key = write_svid(foreign, f"spiffe://{TD}/service/productpage", foreign_dir)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _tls_get("127.0.0.3", m.inbound_port, cert, key)
    # No client certificate at all: refused.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _tls_get("127.0.0.3", m.inbound_port)
    # Control: the same request with a certificate from xdsd's own CA is served.
    ours = CertificateAuthority.load_or_create(m.xdsd.state_dir, TD)
    cert, key = write_svid(ours, f"spiffe://{TD}/service/productpage", tmp_path / "ours")
    assert _tls_get("127.0.0.3", m.inbound_port, cert, key) == 200


@pytest.mark.parametrize("mode", ADS_MODES, ids=mode_ids(ADS_MODES))
def test_an_endpoint_presenting_another_services_identity_is_refused(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    # "reviews" points at the ratings sidecar, which presents a valid SVID, but for ratings.
    m = make_mesh(mode, reviews_endpoint="127.0.0.4", sidecars=("productpage", "ratings"))
    pp = m.envoys["productpage"]
    pp.wait_for(lambda: pp.endpoints_of("reviews") == {f"127.0.0.4:{m.inbound_port}": 1}, "reviews endpoints", 30)
    wait_for(lambda: send_requests(m.url, 1) and pp.stat("cluster.reviews.ssl.fail_verify_san") >= 1,
             "a SAN verification failure", 30)
    results = send_requests(m.url, 10)
    assert all(r.status == 503 for r in results), results
    assert m.ups.stats("ratings") == 0 and m.ups.stats("reviews") == 0


def _serial(envoy: EnvoyProcess) -> str:
    certs = json.loads(envoy.admin_get("/certs"))["certificates"]
    serials = {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}
    return ",".join(sorted(serials))


@pytest.mark.parametrize("mode", ADS_MODES, ids=mode_ids(ADS_MODES))
def test_certificates_rotate_during_steady_traffic_without_failures(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    m = make_mesh(mode, lifetime="2s")
    wait_for(lambda: served_by_reviews(m), "the mesh to work", 30)
    seen: list[str] = []

    def rotated_three_times() -> bool:
        serial = _serial(m.envoys["reviews"])
        if not seen or seen[-1] != serial:
            seen.append(serial)
        return len(set(seen)) >= 4

    with SteadyTraffic(m.url, interval=0.01) as traffic:
        wait_for(rotated_three_times, "reviews' certificate to rotate three times (lifetime 2 s)", 60, interval=0.1)
    assert len(traffic.results) > 100
    assert traffic.failures() == [], f"{len(traffic.failures())} of {len(traffic.results)} failed"


def test_svids_have_the_spiffe_shape(make_mesh: Callable[..., Mesh]) -> None:
    m = make_mesh(ADS)
    wait_for(lambda: served_by_reviews(m), "the mesh to work", 30)
    secrets = m.envoys["reviews"].config_dump("dynamic_active_secrets")
    own = next(c for c in secrets["configs"] if c["name"].endswith("/service/reviews"))
    pem = base64.b64decode(own["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
    leaf = x509.load_pem_x509_certificates(pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/service/reviews"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize(
    "case", ["missing", "forged", "other-service"],
)
def test_a_node_without_a_valid_token_gets_no_configuration_and_no_secret(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    case: str,
) -> None:
    ups = upstreams(SERVICES)
    mesh_file.write(mesh_dict(ups, free_port_on(*SERVICES.values()), free_port()))
    server = xdsd()
    token = {
        "missing": None,
        "forged": server.token("reviews-1", "reviews")[:-4] + "AAAA",
        # a genuine token, for productpage, used by a node that says it is reviews
        "other-service": server.token("reviews-1", "productpage"),
    }[case]
    envoy = envoy_factory(server, "reviews-1", "reviews", mode=ADS, wait_live=False, token=token)
    reason = {"missing": "missing-token", "forged": "bad-token", "other-service": "wrong-cluster"}[case]
    wait_for(lambda: server.metric_value("xdsd_streams_refused_total", {"reason": reason}) >= 1, "the refusal metric", 30)
    refused = server.admin_get_json("/debug/refused")
    assert any(r["reason"].startswith(reason) for r in refused)
    assert server.proxy("reviews-1") is None
    dump = envoy.config_dump()
    dynamic = [c for c in dump["configs"] if c["@type"].endswith(("ClustersConfigDump", "ListenersConfigDump", "SecretsConfigDump"))]
    for section in dynamic:
        for key in ("dynamic_active_clusters", "dynamic_listeners", "dynamic_active_secrets", "dynamic_warming_secrets"):
            assert not section.get(key), f"{key} should be empty: {section.get(key)}"
    # Logged: at call start for a missing or bad token, at the first request for a node's binding.
    log = server.log_tail(200)
    if case == "other-service":
        assert "refused xDS stream" in log
    else:
        assert "StreamAggregatedResources from" in log and f"{reason}:" in log


@pytest.mark.parametrize("mode", ADS_MODES, ids=mode_ids(ADS_MODES))
def test_a_gateway_originates_mtls_to_a_sidecar_service(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    mode: Mode,
) -> None:
    ups = upstreams(SERVICES)
    inbound, gw_port = free_port_on(*SERVICES.values()), free_port()
    mesh = mesh_dict(ups, inbound, free_port())
    mesh["gateways"] = {"edge": {"listen": {"address": "127.0.0.1", "port": gw_port},
                                 "routes": [{"prefix": "/", "service": "reviews"}]}}
    mesh_file.write(mesh)
    server = xdsd()
    envoy_factory(server, "reviews-1", "reviews", mode=mode)
    envoy_factory(server, "edge-1", "edge", mode=mode)
    url = f"http://127.0.0.1:{gw_port}/r"
    wait_for(lambda: send_requests(url, 1)[0].app == "reviews", "edge -> reviews sidecar -> app", 30)
    conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=5)
    conn.request("GET", "/r")
    body = json.loads(conn.getresponse().read())
    xfcc = {k.lower(): v for k, v in body["headers"].items()}["x-forwarded-client-cert"]
    assert f"URI=spiffe://{TD}/gateway/edge" in xfcc


def test_the_xds_port_can_be_served_over_tls(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    tmp_path: Path,
) -> None:
    """An operator's certificate on the xDS port (and the authz HTTP port, which reviews asks)."""
    ups = upstreams(SERVICES)
    out_port = free_port()
    mesh_file.write(mesh_dict(ups, free_port_on(*SERVICES.values()), out_port))
    cert, key, bundle = server_cert(tmp_path / "xds-tls")
    authz_port = free_port()
    server = xdsd(extra_args=["--xds-tls-cert", str(cert), "--xds-tls-key", str(key),
                              "--authz-http-address", f"127.0.0.1:{authz_port}"])
    pp = envoy_factory(server, "productpage-1", "productpage", xds_tls_ca=str(bundle))
    reviews = envoy_factory(server, "reviews-1", "reviews", xds_tls_ca=str(bundle), authz_http_port=authz_port)
    wait_for(lambda: send_requests(f"http://127.0.0.1:{out_port}/x", 1)[0].app == "reviews", "the mesh over TLS xDS", 30)
    assert pp.stat("cluster.xds_cluster.ssl.handshake") >= 1
    # reviews' inbound check went to xdsd's HTTP authz port over TLS, verified with the same CA.
    assert reviews.stat("cluster.xdsd_authz.ssl.handshake") >= 1
    assert reviews.stat("cluster.xdsd_authz.upstream_rq_200") >= 1
