"""The sidecar mesh with real Envoys: app A -> sidecar A -> (mTLS) -> sidecar B -> app B, with
SVIDs issued by xdsd's CA and delivered over SDS, and node tokens guarding the xDS port.

Each "machine" is a loopback address: productpage on 127.0.0.2, reviews on 127.0.0.3, ratings on
127.0.0.4. An app binds its machine's address; its sidecar's inbound listener binds the same address
on the mesh port; outbound listeners bind 127.0.0.1 (so each sidecar gets its own outbound ports).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.conftest import MODES, MeshFile, Mode
from tests.support.envoy import EnvoyProcess
from tests.support.procs import free_port, wait_for
from tests.support.traffic import Client, SteadyTraffic, send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.ca import CertificateAuthority

TD = "example.org"
ADS_MODES = [m for m in MODES if m.ads]


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


def mesh_yaml(ups: Upstreams, inbound_port: int, out_port: int, lifetime: str = "1h",
              reviews_endpoint: str | None = None) -> str:
    def app_port(name: str) -> int:
        return ups.addresses[name][1]

    reviews_eps = f"\n    endpoints: [{{address: {reviews_endpoint}, port: {inbound_port}}}]" if reviews_endpoint else ""
    return f"""
mesh: {{trust_domain: {TD}, cert_lifetime: {lifetime}}}
services:
  productpage:
    sidecar:
      inbound: {{address: 127.0.0.2, port: {inbound_port}}}
      app_address: 127.0.0.2
      app_port: {app_port("productpage")}
      upstreams: {{reviews: {out_port}}}
  reviews:{reviews_eps}
    sidecar:
      inbound: {{address: 127.0.0.3, port: {inbound_port}}}
      app_address: 127.0.0.3
      app_port: {app_port("reviews")}
  ratings:
    sidecar:
      inbound: {{address: 127.0.0.4, port: {inbound_port}}}
      app_address: 127.0.0.4
      app_port: {app_port("ratings")}
"""


@pytest.fixture
def make_mesh(
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
) -> Callable[..., Mesh]:
    def make(mode: Mode, lifetime: str = "1h", reviews_endpoint: str | None = None,
             sidecars: tuple[str, ...] = ("productpage", "reviews")) -> Mesh:
        ups = start_upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"})
        inbound_port = free_port("127.0.0.3")
        out_port = free_port()
        mesh_file.write(mesh_yaml(ups, inbound_port, out_port, lifetime, reviews_endpoint))
        xdsd = start_xdsd(mesh_file.path)
        envoys = {name: start_envoy(xdsd, f"{name}-1", name, mode) for name in sidecars}
        return Mesh(ups, xdsd, mesh_file, inbound_port, out_port, envoys)

    return make


def served_by_reviews(m: Mesh) -> bool:
    return send_requests(m.url, 1)[0].app == "reviews"


@pytest.mark.parametrize("mode", MODES, ids=[m.id for m in MODES])
def test_app_to_app_over_mtls_carries_the_callers_identity(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    m = make_mesh(mode)
    wait_for(lambda: served_by_reviews(m), "productpage -> reviews through both sidecars", 30)
    client = Client(m.url)
    conn_result = client.get()
    assert conn_result.status == 200
    # The reviews app sees who called: the SPIFFE ID from productpage's client certificate.
    import http.client

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


def _write_svid(ca: CertificateAuthority, spiffe_id: str, where: Path) -> tuple[Path, Path]:
    import datetime as dt

    svid = ca.issue(spiffe_id, dt.timedelta(minutes=5))
    cert, key = where / "c.pem", where / "k.pem"
    cert.write_bytes(svid.cert_chain_pem)
    key.write_bytes(svid.key_pem)
    return cert, key


@pytest.mark.parametrize("mode", ADS_MODES, ids=[m.id for m in ADS_MODES])
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
    cert, key = _write_svid(foreign, f"spiffe://{TD}/service/productpage", foreign_dir)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _tls_get("127.0.0.3", m.inbound_port, cert, key)
    # No client certificate at all: refused.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _tls_get("127.0.0.3", m.inbound_port)
    # Control: the same request with a certificate from xdsd's own CA is served.
    ours = CertificateAuthority.load_or_create(m.xdsd.state_dir, TD)
    ok_dir = tmp_path / "ours"
    ok_dir.mkdir()
    cert, key = _write_svid(ours, f"spiffe://{TD}/service/productpage", ok_dir)
    assert _tls_get("127.0.0.3", m.inbound_port, cert, key) == 200


@pytest.mark.parametrize("mode", ADS_MODES, ids=[m.id for m in ADS_MODES])
def test_an_endpoint_presenting_another_services_identity_is_refused(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    # "reviews" points at the ratings sidecar, which presents a valid SVID, but for ratings.
    m = make_mesh(mode, reviews_endpoint="127.0.0.4", sidecars=("productpage", "ratings"))
    pp = m.envoys["productpage"]
    pp.wait_for(lambda: pp.endpoints_of("reviews") == {f"127.0.0.4:{m.inbound_port}": 1}, "reviews endpoints", 30)
    wait_for(lambda: pp.stat("cluster.reviews.ssl.fail_verify_san") >= 1 or send_requests(m.url, 1) and False,
             "a SAN verification failure", 30)
    results = send_requests(m.url, 10)
    assert all(r.status == 503 for r in results), results
    assert m.ups.stats("ratings") == 0 and m.ups.stats("reviews") == 0


def _serial(envoy: EnvoyProcess) -> str:
    certs = json.loads(envoy.admin_get("/certs"))["certificates"]
    serials = {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}
    return ",".join(sorted(serials))


@pytest.mark.parametrize("mode", ADS_MODES, ids=[m.id for m in ADS_MODES])
def test_certificates_rotate_during_steady_traffic_without_failures(make_mesh: Callable[..., Mesh], mode: Mode) -> None:
    m = make_mesh(mode, lifetime="2s")
    wait_for(lambda: served_by_reviews(m), "the mesh to work", 30)
    seen: list[str] = []
    with SteadyTraffic(m.url, interval=0.01) as traffic:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(set(seen)) < 4:
            s = _serial(m.envoys["reviews"])
            if not seen or seen[-1] != s:
                seen.append(s)
            time.sleep(0.1)
    assert len(set(seen)) >= 4, f"reviews' certificates changed only {len(set(seen)) - 1} times: {seen}"
    assert len(traffic.results) > 100
    assert traffic.failures() == [], f"{len(traffic.failures())} of {len(traffic.results)} failed"


def test_svids_have_the_spiffe_shape(make_mesh: Callable[..., Mesh]) -> None:
    m = make_mesh(MODES[0])
    wait_for(lambda: served_by_reviews(m), "the mesh to work", 30)
    secrets = m.envoys["reviews"].config_dump("dynamic_active_secrets")
    own = next(c for c in secrets["configs"] if c["name"].endswith("/service/reviews"))
    import base64

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
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
    case: str,
) -> None:
    ups = start_upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"})
    mesh_file.write(mesh_yaml(ups, free_port("127.0.0.3"), free_port()))
    xdsd = start_xdsd(mesh_file.path)
    token = {
        "missing": None,
        "forged": xdsd.token("reviews-1", "reviews")[:-4] + "AAAA",
        # a genuine token, for productpage, used by a node that says it is reviews
        "other-service": xdsd.token("reviews-1", "productpage"),
    }[case]
    envoy = start_envoy(xdsd, "reviews-1", "reviews", MODES[0], wait_live=False, token=token)
    reason = {"missing": "missing-token", "forged": "bad-token", "other-service": "wrong-cluster"}[case]
    wait_for(lambda: xdsd.metric_value("xdsd_streams_refused_total", {"reason": reason}) >= 1, "the refusal metric", 30)
    refused = xdsd.admin_get_json("/debug/refused")
    assert any(r["reason"].startswith(reason) for r in refused)
    assert xdsd.proxy("reviews-1") is None
    dump = envoy.config_dump()
    dynamic = [c for c in dump["configs"] if c["@type"].endswith(("ClustersConfigDump", "ListenersConfigDump", "SecretsConfigDump"))]
    for section in dynamic:
        for key in ("dynamic_active_clusters", "dynamic_listeners", "dynamic_active_secrets", "dynamic_warming_secrets"):
            assert not section.get(key), f"{key} should be empty: {section.get(key)}"
    # Logged: at call start for a missing or bad token, at the first request for a node's binding.
    assert "refused xDS stream" in xdsd.log_tail(200) if case == "other-service" else (
        "StreamAggregatedResources from" in xdsd.log_tail(200) and f"{reason}:" in xdsd.log_tail(200))


@pytest.mark.parametrize("mode", ADS_MODES, ids=[m.id for m in ADS_MODES])
def test_a_gateway_originates_mtls_to_a_sidecar_service(
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_envoy: Callable[..., EnvoyProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
    mode: Mode,
) -> None:
    ups = start_upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"})
    inbound, gw_port = free_port("127.0.0.3"), free_port()
    mesh_file.write(
        mesh_yaml(ups, inbound, free_port())
        + f"gateways:\n  edge:\n    listen: {{address: 127.0.0.1, port: {gw_port}}}\n"
        + "    routes: [{prefix: /, service: reviews}]\n"
    )
    xdsd = start_xdsd(mesh_file.path)
    start_envoy(xdsd, "reviews-1", "reviews", mode)
    start_envoy(xdsd, "edge-1", "edge", mode)
    url = f"http://127.0.0.1:{gw_port}/r"
    wait_for(lambda: send_requests(url, 1)[0].app == "reviews", "edge -> reviews sidecar -> app", 30)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=5)
    conn.request("GET", "/r")
    body = json.loads(conn.getresponse().read())
    xfcc = {k.lower(): v for k, v in body["headers"].items()}["x-forwarded-client-cert"]
    assert f"URI=spiffe://{TD}/gateway/edge" in xfcc


def _server_cert(where: Path) -> tuple[Path, Path]:
    """A TLS server certificate for 127.0.0.1 from a throwaway CA; returns (cert, key), CA at where/ca.pem."""
    import datetime as dt
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = CertificateAuthority.load_or_create(where / "xds-ca", "xds")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdsd")]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca.signing_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = where / "xds.pem", where / "xds.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (where / "ca.pem").write_bytes(ca.bundle_pem)
    return cert_path, key_path


def test_the_xds_port_can_be_served_over_tls(
    mesh_file: MeshFile,
    start_xdsd: Callable[..., XdsdProcess],
    start_upstreams: Callable[[dict[str, str]], Upstreams],
    tmp_path: Path,
) -> None:
    from xdsd.bootstrap import BootstrapOptions, render

    ups = start_upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"})
    out_port = free_port()
    mesh_file.write(mesh_yaml(ups, free_port("127.0.0.3"), out_port))
    cert, key = _server_cert(tmp_path)
    authz_port = free_port()  # ext_authz over HTTP uses the same certificate (reviews asks that way)
    xdsd = start_xdsd(mesh_file.path, extra_args=["--xds-tls-cert", str(cert), "--xds-tls-key", str(key),
                                                  "--authz-http-address", f"127.0.0.1:{authz_port}"])
    envoys = []
    for name in ("productpage", "reviews"):
        opts = BootstrapOptions(
            node_id=f"{name}-1", cluster=name, xds_port=xdsd.xds_port, admin_port=free_port(),
            token=xdsd.token(f"{name}-1", name), xds_tls_ca=str(tmp_path / "ca.pem"),
            authz_http_port=authz_port if name == "reviews" else None,
        )
        envoys.append(EnvoyProcess(name, render(opts), tmp_path).start())
    try:
        wait_for(lambda: send_requests(f"http://127.0.0.1:{out_port}/x", 1)[0].app == "reviews", "the mesh over TLS xDS", 30)
        assert envoys[0].stat("cluster.xds_cluster.ssl.handshake") >= 1
        # reviews' inbound check went to xdsd's HTTP authz port over TLS, verified with the same CA.
        assert envoys[1].stat("cluster.xdsd_authz.ssl.handshake") >= 1
        assert envoys[1].stat("cluster.xdsd_authz.upstream_rq_200") >= 1
    finally:
        for e in envoys:
            e.stop()
