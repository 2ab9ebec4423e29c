"""ext_authz with real Envoys: sidecars ask xdsd whether the (mTLS-authenticated) caller may make
this request; principals are real SPIFFE IDs from the peers' certificates."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.certs import write_svid
from tests.support.envoy import EnvoyFactory
from tests.support.meshes import ADS, ADS_MODES, MeshFile, Mode, sidecar_mesh
from tests.support.procs import free_port, free_port_on, wait_for
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess
from xdsd.ca import CertificateAuthority

TD = "example.org"
# How sidecars ask xdsd: gRPC on the xDS cluster (default bootstrap), or HTTP/1.1 (--authz-http-port).
TRANSPORTS = ["grpc", "http"]
CASES = [(m, "grpc") for m in ADS_MODES] + [(ADS, "http")]
CASE_IDS = [f"{m.id}-{t}" for m, t in CASES]

POLICY = """
authorization:
  reviews:
    default: deny
    rules:
      - {name: pp-read, allow: {from: [productpage], methods: [GET], paths: ["/reviews/*"]}}
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: pp-everything, allow: {from: [productpage], methods: [GET], paths: ["/admin", "/admin/*"]}}
      - {name: ratings-probe, dry_run: true, allow: {from: [ratings]}}
"""


@dataclass
class AuthzMesh:
    ups: Upstreams
    xdsd: XdsdProcess
    mesh_file: MeshFile
    inbound_port: int
    pp_out: int
    ratings_out: int

    def get(self, out_port: int, path: str, method: str = "GET") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", out_port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def rules(self, mesh: dict[str, Any]) -> list[dict[str, Any]]:
        """reviews' rules in ``mesh`` (for ``mesh_file.update``)."""
        return mesh["authorization"]["reviews"]["rules"]


MakeMesh = Callable[..., AuthzMesh]


@pytest.fixture
def make_mesh(mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess], envoy_factory: EnvoyFactory,
              upstreams: Callable[..., Upstreams]) -> MakeMesh:
    """productpage and ratings (sidecars) both call reviews (sidecar) under ``policy``."""
    def make(mode: Mode, transport: str = "grpc", policy: str = POLICY) -> AuthzMesh:
        ups = upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3", "ratings": "127.0.0.4"})
        inbound, pp_out, ratings_out = free_port_on("127.0.0.2", "127.0.0.3", "127.0.0.4"), free_port(), free_port()
        mesh = sidecar_mesh(ups, inbound, {"productpage": {"reviews": pp_out}, "ratings": {"reviews": ratings_out}},
                            trust_domain=TD)
        mesh_file.write({**mesh, **yaml.safe_load(policy)})
        extra: list[str] = []
        bootstrap: dict[str, int] = {}
        if transport == "http":
            port = free_port()
            extra = ["--authz-http-address", f"127.0.0.1:{port}"]
            bootstrap = {"authz_http_port": port}
        server = xdsd(extra_args=extra)
        for name in ("productpage", "reviews", "ratings"):
            envoy_factory(server, f"{name}-1", name, mode=mode, **bootstrap)
        m = AuthzMesh(ups, server, mesh_file, inbound, pp_out, ratings_out)
        if policy is POLICY:
            wait_for(lambda: m.get(pp_out, "/reviews/1")[0] == 200, "productpage -> reviews allowed", 30)
        return m

    return make


@pytest.mark.parametrize(("mode", "transport"), CASES, ids=CASE_IDS)
def test_who_may_call_what(make_mesh: MakeMesh, mode: Mode, transport: str) -> None:
    m = make_mesh(mode, transport)
    assert m.get(m.pp_out, "/reviews/1")[0] == 200
    status, body = m.get(m.ratings_out, "/reviews/1")
    assert status == 403 and "access denied by xdsd" in body and "rule default" in body
    status, body = m.get(m.pp_out, "/admin")
    assert status == 403 and "rule no-admin" in body  # deny wins over productpage's allow
    assert m.get(m.pp_out, "/admin/users")[0] == 403
    assert m.get(m.pp_out, "/reviews/1", method="POST")[0] == 403
    allowed = m.xdsd.metric_value("xdsd_authz_decisions_total", {"service": "reviews", "rule": "pp-read", "outcome": "allow"})
    denied = m.xdsd.metric_value("xdsd_authz_decisions_total", {"service": "reviews", "rule": "no-admin", "outcome": "deny"})
    assert allowed >= 1 and denied >= 2
    # The dry-run rule matched ratings' request: counted, but it did not allow it.
    assert m.xdsd.metric_value("xdsd_authz_decisions_total", {"rule": "ratings-probe", "outcome": "dry-run-allow"}) >= 1


def _status(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _raw_tls(port: int, request: bytes, cert: Path, key: Path) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.3", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def _svid_files(m: AuthzMesh, tmp_path: Path, service: str) -> tuple[Path, Path]:
    """A client certificate for ``service`` from xdsd's own CA."""
    ca = CertificateAuthority.load_or_create(m.xdsd.state_dir, TD)
    return write_svid(ca, f"spiffe://{TD}/service/{service}", tmp_path / "svids", service)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_path_confusion_cannot_reach_admin(make_mesh: MakeMesh, transport: str, tmp_path: Path) -> None:
    m = make_mesh(ADS, transport)
    # Straight at reviews' inbound listener, as productpage (a client certificate from xdsd's CA),
    # so that nothing but the inbound sidecar normalizes the path.
    cert, key = _svid_files(m, tmp_path, "productpage")
    before = m.ups.stats("reviews")
    assert _raw_tls(m.inbound_port, b"GET /reviews/1 HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n", cert, key) == 200
    for path in ["/admin", "//admin", "/x/../admin", "/%61dmin", "/%2Fadmin", "/%2fadmin/", "/reviews/../admin", "/./admin"]:
        status = _raw_tls(m.inbound_port, f"GET {path} HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n".encode(), cert, key)
        assert status in (400, 403), f"{path} got {status}"
        out_status = m.get(m.pp_out, path)[0]
        assert out_status in (400, 403), f"{path} via the outbound listener got {out_status}"
    assert m.ups.stats("reviews") == before + 1  # only the one allowed request reached the app


@pytest.mark.parametrize(("mode", "transport"), CASES, ids=CASE_IDS)
def test_fail_closed_while_the_authz_service_is_down(make_mesh: MakeMesh, mode: Mode, transport: str) -> None:
    m = make_mesh(mode, transport)
    m.xdsd.kill()
    statuses = [m.get(m.pp_out, "/reviews/1")[0] for _ in range(5)]
    assert statuses == [403] * 5
    m.xdsd.start()
    wait_for(lambda: m.get(m.pp_out, "/reviews/1")[0] == 200, "requests to pass again", 30)


def test_fail_closed_while_the_authz_service_hangs(make_mesh: MakeMesh) -> None:
    """A hung xdsd (stopped: the kernel still accepts its connections, nothing answers) is no
    better than a dead one: reviews' sidecar gives up on the check at its timeout and denies. The
    request is answered 403, not held (the client would time out), and not by a policy decision
    (the policy allows productpage). When xdsd resumes, requests pass again."""
    m = make_mesh(ADS)
    pid = m.xdsd.proc.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        answers = [m.get(m.pp_out, "/reviews/1") for _ in range(3)]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [status for status, _ in answers] == [403] * 3, answers
    assert not any("access denied by xdsd" in body for _, body in answers), answers
    wait_for(lambda: m.get(m.pp_out, "/reviews/1")[0] == 200, "requests to pass again", 30)


@pytest.mark.parametrize(("mode", "transport"), CASES, ids=CASE_IDS)
def test_a_live_policy_edit_changes_decisions(make_mesh: MakeMesh, mode: Mode, transport: str) -> None:
    m = make_mesh(mode, transport)
    assert m.get(m.ratings_out, "/reviews/1")[0] == 403
    m.mesh_file.update(lambda mesh: m.rules(mesh).__setitem__(
        -1, {"name": "ratings-read", "allow": {"from": ["ratings"], "methods": ["GET"]}}))
    wait_for(lambda: m.get(m.ratings_out, "/reviews/1")[0] == 200, "ratings to be allowed", 15)
    # An invalid edit (unknown service in `from`) is refused; decisions stay as they were.
    m.mesh_file.update(lambda mesh: m.rules(mesh)[-1]["allow"].update({"from": ["ghost"]}))
    wait_for(lambda: m.xdsd.metric_value("xdsd_config_rejections_total") >= 1, "the rejection", 15)
    assert m.get(m.ratings_out, "/reviews/1")[0] == 200


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_odd_requests_get_a_decision_not_a_crash(make_mesh: MakeMesh, transport: str) -> None:
    m = make_mesh(ADS, transport)
    many = {f"x-h{i}": "v" * 50 for i in range(90)}
    conn = http.client.HTTPConnection("127.0.0.1", m.pp_out, timeout=5)
    conn.request("GET", "/reviews/1", headers=many)
    assert conn.getresponse().status == 200
    conn.close()
    assert m.get(m.pp_out, "/reviews/" + "a" * 12000)[0] in (200, 400, 403, 414, 431)
    assert m.get(m.pp_out, "/reviews/%00%ff%c3%28?q=%ff")[0] in (200, 400, 403)
    with socket.create_connection(("127.0.0.1", m.pp_out), timeout=5) as s:
        s.sendall(b"GET /reviews/1 HTTP/1.1\r\nhost: r\r\nx-bytes: caf\xc3\xa9 \xff\xfe\x80\r\nconnection: close\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 ")
    assert m.xdsd.http_status("/healthz") == 200
    assert m.get(m.pp_out, "/reviews/1")[0] == 200


HEADER_POLICY = """
authorization:
  reviews:
    default: deny
    rules:
      - {name: tenant-a, allow: {from: [productpage], headers: {x-tenant: a}}}
      - {name: bearer, allow: {from: [ratings], headers: {authorization: Bearer ok}}}
      - {name: probe, dry_run: true, deny: {paths: ["/reviews/probe"]}}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_header_rules_dry_run_report_and_the_http_transport_wiring(make_mesh: MakeMesh, envoy_factory: EnvoyFactory,
                                                                   transport: str) -> None:
    """The headers a policy reads reach the decision over either transport (over HTTP only those are
    sent, and ``authorization`` only because a rule reads it); a dry-run rule is reported to the
    client in a response header while the request passes."""
    m = make_mesh(ADS, transport, HEADER_POLICY)
    wait_for(lambda: _status(m.pp_out, "/reviews/1", {"x-tenant": "a"}) == 200, "tenant a allowed", 30)
    assert _status(m.pp_out, "/reviews/1", {"x-tenant": "b"}) == 403
    assert _status(m.pp_out, "/reviews/1") == 403
    assert _status(m.ratings_out, "/reviews/1", {"authorization": "Bearer ok"}) == 200
    assert _status(m.ratings_out, "/reviews/1", {"authorization": "Bearer no"}) == 403
    conn = http.client.HTTPConnection("127.0.0.1", m.pp_out, timeout=5)
    conn.request("GET", "/reviews/probe", headers={"x-tenant": "a"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("x-xdsd-authz-dry-run") == "probe=deny"
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", m.pp_out, timeout=5)
    conn.request("GET", "/reviews/1", headers={"x-tenant": "b"})
    resp = conn.getresponse()
    assert resp.status == 403 and resp.getheader("x-xdsd-authz") == "deny; rule=default"
    conn.close()
    if transport == "http":
        # Envoy's own view: the inbound listener's filter asks xdsd's HTTP cluster, reviews in the
        # path prefix, only the headers the policy reads allowed through.
        reviews = next(e for e in envoy_factory.started if e.name == "reviews-1")
        text = json.dumps(reviews.config_dump("dynamic_listeners"))
        assert '"path_prefix": "/_xdsd/authz/reviews/"' in text and '"cluster": "xdsd_authz"' in text
        assert '"exact": "x-tenant"' in text and '"exact": "x-forwarded-client-cert"' in text
        assert '"disallowed_headers"' not in text  # a rule reads authorization, so it is sent


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_caller_cannot_claim_another_identity(make_mesh: MakeMesh, transport: str, tmp_path: Path) -> None:
    """ratings, with its own certificate, sends an x-forwarded-client-cert naming productpage: the
    inbound listener replaces it with the verified peer identity, so the decision is still ratings'."""
    m = make_mesh(ADS, transport)
    cert, key = _svid_files(m, tmp_path, "ratings")
    forged = f"By=spiffe://{TD}/service/reviews;URI=spiffe://{TD}/service/productpage"
    request = f"GET /reviews/1 HTTP/1.1\r\nhost: r\r\nx-forwarded-client-cert: {forged}\r\nconnection: close\r\n\r\n"
    assert _raw_tls(m.inbound_port, request.encode(), cert, key) == 403
    # The same request as productpage (its own certificate) is allowed.
    assert _raw_tls(m.inbound_port, request.encode(), *_svid_files(m, tmp_path, "productpage")) == 200


PARAMS_POLICY = """
authorization:
  reviews:
    default: allow
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: no-pp-orders, deny: {from: [productpage], paths: ["/orders-only/*"]}}
"""




def _inbound_get(m: AuthzMesh, path: str, cert_key: tuple[Path, Path]) -> int:
    return _raw_tls(m.inbound_port, f"GET {path} HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n".encode(), *cert_key)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_path_parameters_cannot_get_past_a_rule(make_mesh: MakeMesh, transport: str, tmp_path: Path) -> None:
    """Servlet containers serve /admin;x as /admin: a rule sees the path with its parameters removed,
    on either transport. Straight at reviews' inbound listener (only that Envoy normalizes), and
    through productpage's outbound listener."""
    m = make_mesh(ADS, transport, PARAMS_POLICY)
    pp, ratings = _svid_files(m, tmp_path, "productpage"), _svid_files(m, tmp_path, "ratings")
    wait_for(lambda: m.get(m.pp_out, "/reviews/1")[0] == 200, "productpage -> reviews allowed", 30)
    before = m.ups.stats("reviews")
    # Allowed paths still reach the app, parameters and all (the request goes on unchanged).
    assert _inbound_get(m, "/reviews/1", pp) == 200
    assert _inbound_get(m, "/reviews/1;v=2", pp) == 200
    assert _inbound_get(m, "/orders-only;p/x", ratings) == 200
    assert m.get(m.pp_out, "/reviews/1;jsessionid=a")[0] == 200
    # Envoy forwards /x/%2e%2e;/admin as /x/..;/admin: /admin to a servlet.
    for path in ["/admin;x", "/admin;x/y", "/x/..;/admin", "/x/%2e%2e;/admin", "/admin;jsessionid=1", "/%61dmin;x/"]:
        assert _inbound_get(m, path, pp) == 403, path
        status, body = m.get(m.pp_out, path)
        assert status == 403 and "rule no-admin" in body, (path, status, body)
    # ...and /admin/%2e%2e;/reviews/1 as /admin/..;/reviews/1: under /admin/ to an app without path
    # parameters. (Through the outbound listener, the inbound Envoy reads that "..;" as ".." itself.)
    assert _inbound_get(m, "/admin/%2e%2e;/reviews/1", pp) == 403
    assert _inbound_get(m, "/orders-only/x", pp) == 403
    for path in ["/orders-only;p/x", "/orders-only;/x", "/x/%2e%2e;/orders-only/x"]:
        assert _inbound_get(m, path, pp) == 403, path
        status, body = m.get(m.pp_out, path)
        assert status == 403 and "rule no-pp-orders" in body, (path, status, body)
    assert m.ups.stats("reviews") == before + 4  # only the allowed requests reached the app


CASE_POLICY = """
authorization:
  reviews:
    default: allow
    paths_case: sensitive
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_paths_case_insensitive_denies_other_cases(make_mesh: MakeMesh, transport: str) -> None:
    """Case is significant (an app that ignores case serves /ADMIN as /admin): a policy opts in."""
    m = make_mesh(ADS, transport, CASE_POLICY)
    wait_for(lambda: m.get(m.pp_out, "/reviews/1")[0] == 200, "productpage -> reviews allowed", 30)
    assert m.get(m.pp_out, "/admin")[0] == 403
    before = m.ups.stats("reviews")
    assert m.get(m.pp_out, "/ADMIN")[0] == 200
    assert m.ups.stats("reviews") == before + 1
    m.mesh_file.update(lambda mesh: mesh["authorization"]["reviews"].update(paths_case="insensitive"))
    wait_for(lambda: m.get(m.pp_out, "/ADMIN")[0] == 403, "/ADMIN to be denied", 15)
    for path in ["/ADMIN", "/Admin/x", "/aDmIn;x", "/%41DMIN/"]:
        status, body = m.get(m.pp_out, path)
        assert status == 403 and "rule no-admin" in body, (path, status, body)
    assert m.get(m.pp_out, "/Reviews/1")[0] == 200
