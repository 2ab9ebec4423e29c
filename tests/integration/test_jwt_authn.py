"""End-user authentication (``authentication:``) with a real Envoy and an identity provider the test
runs on loopback (tests.support.idp): JWTs signed here with RS256 and ES256, a rotatable key set,
and the OIDC authorization code flow."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.support.certs import server_cert
from tests.support.envoy import EnvoyFactory
from tests.support.idp import IdentityProvider, SigningKey, jwks
from tests.support.meshes import ADS, MeshFile, sidecar_mesh
from tests.support.procs import free_port, free_port_on, wait_for
from tests.support.traffic import Client
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


def _mesh(idp: IdentityProvider, web: tuple[str, int], edge: int, inline: SigningKey, extra: str = "") -> str:
    return f"""
services:
  web: {{endpoints: [{{address: {web[0]}, port: {web[1]}}}]}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {edge}}}
    routes:
      - {{prefix: /, service: web}}
authentication:
  issuers:
    corp:
      issuer: {idp.issuer}
      jwks_uri: {idp.base}/jwks
      jwks_cache_duration: 1s
      audiences: [shop]
      forward_claims: {{sub: x-user, email: x-user-email}}
    partner:
      issuer: https://partner.example
      jwks: '{json.dumps(jwks(inline))}'
      audiences: [shop]
  require:
    edge: {{issuers: [corp, partner], paths: ["/api/*", "/admin/*"]}}
authorization:
  edge:
    default: deny
    rules:
      - {{name: admins, allow: {{paths: ["/admin/*"], claims: {{groups: admins}}}}}}
      - {{name: alice-me, allow: {{paths: ["/me"], request_principals: ["{idp.issuer}/alice"]}}}}
      - {{name: open, allow: {{paths: ["/api/*", "/public/*"]}}}}
{extra}"""


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_jwt_at_a_gateway(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    idp: IdentityProvider,
) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    edge = free_port()
    partner = SigningKey("ES256")
    mesh_file.write(_mesh(idp, ups.address("web"), edge, partner))
    server = xdsd()
    envoy = envoy_factory(server, "edge-1", "edge", mode=ADS)
    client = Client(f"http://127.0.0.1:{edge}/")
    good = idp.token(sub="alice", email="alice@example.com")
    envoy.wait_for(lambda: client.get("/api/x", _bearer(good)).status == 200, "a valid token passes", 30)

    # Valid (RS256 from the fetched key set): claims forwarded as headers, a client's copy replaced.
    seen = client.request("GET", "/api/orders", {**_bearer(good), "x-user": "mallory"}).json()["headers"]
    assert seen["x-user"] == "alice"
    assert seen["x-user-email"] == "alice@example.com"
    # Valid ES256 from the inline key set.
    es = partner.sign({**idp.claims(sub="bob"), "iss": "https://partner.example"})
    assert client.request("GET", "/api/orders", _bearer(es)).status == 200

    # Missing, expired, not yet valid, wrong audience or issuer, tampered, unknown key: 401 with Envoy's reason.
    # A wrong audience is Envoy's 403 (authentic, for someone else): the mesh answers it 401 too.
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    stranger = SigningKey("RS256")
    cases = {
        "missing": ({}, "Jwt is missing", 401),
        "expired": (_bearer(idp.token(lifetime=-120)), "Jwt is expired", 401),
        "not yet valid": (_bearer(idp.token(nbf=int(idp.claims()["iat"]) + 3600)), "Jwt not yet valid", 401),
        "wrong audience": (_bearer(idp.token(aud="other")), "Audiences in Jwt are not allowed", 401),
        "wrong issuer": (_bearer(stranger.sign({**idp.claims(), "iss": "https://evil.example"})),
                         "Jwt issuer is not configured", 401),
        "tampered": (_bearer(tampered), "Jwt verification fails", 401),
        "unknown key": (_bearer(idp.token(key=stranger)), "Jwks doesn't have key to match kid or alg from Jwt", 401),
    }
    for name, (headers, reason, status) in cases.items():
        resp = client.request("GET", "/api/orders", headers)
        assert resp.status == status, (name, resp.status, resp.body)
        assert reason in resp.body.decode(), (name, resp.body)
        assert resp.headers["www-authenticate"].startswith("Bearer "), name
    # ;parameters, escapes, dot segments and doubled slashes do not dodge it either (Envoy
    # normalizes the path before jwt_authn matches it; xdsd's regex adds the ;parameters).
    for dodge in ("/api;x/orders", "/%61pi/orders", "//api/orders", "/x/../api/orders", "/api%2Forders"):
        dodged = client.request("GET", dodge)
        assert dodged.status == 401 and b"Jwt is missing" in dodged.body, dodge

    # Not a required path: no token needed, and a client's x-user never reaches the app.
    seen = client.request("GET", "/public/page", {"x-user": "mallory", "x-user-email": "m@x"}).json()["headers"]
    assert "x-user" not in seen and "x-user-email" not in seen

    # Authorization on claims: allowed with groups=admins (list-valued claim), denied without.
    admin = idp.token(sub="carol", groups=["users", "admins"])
    user = idp.token(sub="dave", groups=["users"])
    assert client.request("GET", "/admin/panel", _bearer(admin)).status == 200
    denied = client.request("GET", "/admin/panel", _bearer(user))
    assert denied.status == 403 and denied.headers.get("x-xdsd-authz") == "deny; rule=default"
    # request_principals: <iss>/<sub>; /me needs no token, but only alice's is allowed.
    assert client.request("GET", "/me", _bearer(good)).status == 200
    assert client.request("GET", "/me", _bearer(idp.token(sub="eve"))).status == 403
    anonymous = client.request("GET", "/me", {"x-user": "alice"})  # a header is not an identity
    assert anonymous.status == 401 and anonymous.headers.get("x-xdsd-authz") == "deny; rule=default"

    # Key rotation at the provider: picked up without a restart (cache duration 1s).
    old = idp.rotate()
    fresh = idp.token(sub="alice")
    wait_for(lambda: client.request("GET", "/api/x", _bearer(fresh)).status == 200, 30, "rotated key accepted")
    assert client.request("GET", "/api/x", _bearer(idp.token(key=old))).status == 401
    assert envoy.running


def test_a_bad_authentication_edit_keeps_the_last_good_config(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    idp: IdentityProvider,
) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    edge = free_port()
    good_mesh = _mesh(idp, ups.address("web"), edge, SigningKey("ES256"))
    mesh_file.write(good_mesh)
    server = xdsd()
    envoy = envoy_factory(server, "edge-1", "edge", mode=ADS)
    client = Client(f"http://127.0.0.1:{edge}/")
    token = idp.token()
    envoy.wait_for(lambda: client.get("/api/x", _bearer(token)).status == 200, "serves", 30)
    mesh_file.write(good_mesh.replace("issuers: [corp, partner]", "issuers: [corp, nobody]"))
    server.wait_for(lambda: "authentication.require.edge.issuers[1]: unknown issuer 'nobody'" in server.log_tail(200), 30,
             "the edit is refused with its field path")
    assert client.request("GET", "/api/x", _bearer(token)).status == 200
    assert client.request("GET", "/api/x").status == 401


def _cookies(resp: http.client.HTTPResponse, jar: dict[str, str]) -> None:
    for name, value in resp.getheaders():
        if name.lower() == "set-cookie":
            pair = value.split(";", 1)[0]
            k, _, v = pair.partition("=")
            if "expires=thu, 01 jan 1970" in value.lower() or "max-age=0" in value.lower():
                jar.pop(k.strip(), None)
            else:
                jar[k.strip()] = v.strip()


def _get(url: str, jar: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        _cookies(resp, jar)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def test_oidc_login_at_a_gateway(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    idp: IdentityProvider,
    tmp_path: Path,
) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    host, port = ups.address("web")
    edge = free_port()
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(idp.client_secret + "\n")
    mesh_file.write(f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {edge}}}
    routes:
      - prefix: /app
        service: web
        login: {{issuer: corp, client_id: {idp.client_id}, client_secret_file: {secret_file},
                 redirect_path: /oauth2/callback, scopes: [openid, email]}}
      - {{prefix: /, service: web}}
authentication:
  issuers:
    corp:
      issuer: {idp.issuer}
      jwks_uri: {idp.base}/jwks
      audiences: [shop]
      forward_claims: {{sub: x-user}}
      authorization_endpoint: {idp.base}/authorize
      token_endpoint: {idp.base}/token
""")
    server = xdsd()
    envoy = envoy_factory(server, "edge-1", "edge", mode=ADS)
    base = f"http://127.0.0.1:{edge}"
    envoy.wait_for(lambda: _get(f"{base}/other", {})[0] == 200, "the gateway serves", 30)
    # The secret reached Envoy over SDS, never inline in the listener.
    listeners = json.dumps(envoy.config_dump("dynamic_listeners"))
    assert "envoy.filters.http.oauth2" in listeners and idp.client_secret not in listeners
    assert "oauth2|edge|client" in listeners

    # Outside the login's prefix a bearer token (an API client) passes the oauth2 filter untouched.
    api = Client(base).request("GET", "/other", _bearer(idp.token(sub="bob")))
    assert api.status == 200 and api.json()["headers"]["x-user"] == "bob", api.body

    jar: dict[str, str] = {}
    status, headers, _ = _get(f"{base}/app/page", jar)
    assert status == 302, (status, headers)
    login = urlsplit(headers["location"])
    assert f"{login.scheme}://{login.netloc}{login.path}" == f"{idp.base}/authorize"
    query = parse_qs(login.query)
    assert query["client_id"] == [idp.client_id] and "email" in query["scope"][0].split()
    assert query["redirect_uri"] == [f"{base}/oauth2/callback"]

    status, headers, _ = _get(headers["location"], {})  # the provider "logs alice in"
    assert status == 302 and headers["location"].startswith(f"{base}/oauth2/callback?code=")
    status, headers, body = _get(headers["location"], jar)  # Envoy exchanges the code for tokens
    assert status == 302, (status, headers, body)
    assert urlsplit(headers["location"]).path == "/app/page"
    assert idp.token_requests and idp.token_requests[-1]["grant_type"] == ["authorization_code"]
    assert idp.token_requests[-1]["code_verifier"] and query["code_challenge_method"] == ["S256"]  # PKCE
    assert "BearerToken" in jar and "OauthHMAC" in jar

    for dodge in ("/%61pp/page", "//app/page", "/x/../app/page", "/app;x/page"):  # no way around the login
        assert _get(f"{base}{dodge}", {})[0] == 302, dodge
    status, _, body = _get(f"{base}/app/page", jar)
    assert status == 200, (status, body)
    seen = json.loads(body)["headers"]
    assert seen["authorization"].startswith("Bearer ")
    assert seen["x-user"] == "alice"  # the access token is a JWT of corp: verified, claims forwarded

    status, headers, _ = _get(f"{base}/oauth2/signout", jar)
    assert status == 302
    assert "BearerToken" not in jar and "OauthHMAC" not in jar
    status, _, _ = _get(f"{base}/app/page", jar)
    assert status == 302  # logged out: back to the provider


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_jwt_at_a_sidecar_with_claims_in_its_policy(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    idp: IdentityProvider,
    transport: str,
) -> None:
    """productpage's app calls reviews with the end user's token; reviews' sidecar verifies it and
    xdsd decides on its claims. With an HTTP-checking bootstrap too: a policy on claims is asked
    over gRPC, where the verified payload travels as metadata."""
    ups = upstreams({"productpage": "127.0.0.2", "reviews": "127.0.0.3"})
    inbound, pp_out = free_port_on("127.0.0.2", "127.0.0.3"), free_port()
    mesh = sidecar_mesh(ups, inbound, {"productpage": {"reviews": pp_out}}, services=("productpage", "reviews"))
    mesh_file.write({**mesh, **yaml.safe_load(f"""
authentication:
  issuers:
    corp: {{issuer: "{idp.issuer}", jwks_uri: "{idp.base}/jwks", audiences: [shop], forward_claims: {{sub: x-user}}}}
  require:
    reviews: {{issuers: [corp], paths: ["/reviews/*"]}}
authorization:
  reviews:
    default: deny
    rules:
      - {{name: readers, allow: {{from: [productpage], claims: {{groups: readers}}}}}}
""")})
    extra: list[str] = []
    bootstrap: dict[str, int] = {}
    if transport == "http":
        port = free_port()
        extra, bootstrap = ["--authz-http-address", f"127.0.0.1:{port}"], {"authz_http_port": port}
    server = xdsd(extra_args=extra)
    for name in ("productpage", "reviews"):
        envoy_factory(server, f"{name}-1", name, mode=ADS, **bootstrap)
    client = Client(f"http://127.0.0.1:{pp_out}/")
    reader = idp.token(sub="alice", groups=["readers"])
    wait_for(lambda: client.get("/reviews/1", _bearer(reader)).status == 200, 30, "a reader reaches reviews")
    seen = client.request("GET", "/reviews/1", {**_bearer(reader), "x-user": "mallory"}).json()["headers"]
    assert seen["x-user"] == "alice" and seen["x-forwarded-client-cert"]
    missing = client.request("GET", "/reviews/1")
    assert missing.status == 401 and "Jwt is missing" in missing.body.decode()
    other = client.request("GET", "/reviews/1", _bearer(idp.token(sub="bob", groups=["writers"])))
    assert other.status == 403 and other.headers.get("x-xdsd-authz") == "deny; rule=default"
    assert client.request("GET", "/other", {"x-user": "alice"}).status == 403  # no token: no claims


def test_keys_fetched_over_https_are_verified_against_the_ca(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    tmp_path: Path,
) -> None:
    cert, key, bundle = server_cert(tmp_path)
    wrong_ca = server_cert(tmp_path / "other")[2]
    ups = upstreams({"web": "127.0.0.2"})
    host, port = ups.address("web")
    edge, other = free_port(), free_port()
    with IdentityProvider(tls=(cert, key)) as idp, IdentityProvider(tls=(cert, key)) as idp2:
        assert idp.base.startswith("https://")
        mesh_file.write(f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {edge}}}, routes: [{{prefix: /, service: web}}]}}
  other: {{listen: {{address: 127.0.0.1, port: {other}}}, routes: [{{prefix: /, service: web}}]}}
authentication:
  issuers:
    corp: {{issuer: "{idp.issuer}", jwks_uri: "{idp.base}/jwks", ca_file: "{bundle}"}}
    untrusted: {{issuer: "{idp2.issuer}", jwks_uri: "{idp2.base}/jwks", ca_file: "{wrong_ca}"}}
  require:
    edge: {{issuers: [corp]}}
    other: {{issuers: [untrusted]}}
""")
        server = xdsd()
        envoy_factory(server, "edge-1", "edge", mode=ADS)
        envoy_factory(server, "other-1", "other", mode=ADS)
        token = idp.token()
        edge_client, other_client = Client(f"http://127.0.0.1:{edge}/"), Client(f"http://127.0.0.1:{other}/")
        wait_for(lambda: edge_client.get("/x", _bearer(token)).status == 200, 30, "keys fetched over https")
        wait_for(lambda: other_client.get("/x").status == 401, 30, "the other gateway serves")
        # A provider behind a certificate the issuer's ca_file does not trust: no keys.
        refused = other_client.request("GET", "/x", _bearer(idp2.token()))
        assert refused.status == 401 and "Jwks remote fetch is failed" in refused.body.decode(), refused.body


def test_no_gateway_passes_a_clients_claim_headers(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    idp: IdentityProvider,
) -> None:
    """edge verifies corp's tokens and forwards ``sub`` in x-user; partner, routing to the same app,
    verifies none: a client's x-user must not reach the app through either. And edge's policy says
    its app ignores case: /API/x needs the token /api/* needs."""
    ups = upstreams({"web": "127.0.0.2"})
    host, port = ups.address("web")
    edge, partner = free_port(), free_port()
    mesh_file.write(f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {edge}}}, routes: [{{prefix: /, service: web}}]}}
  partner: {{listen: {{address: 127.0.0.1, port: {partner}}}, routes: [{{prefix: /, service: web}}]}}
authentication:
  issuers:
    corp:
      issuer: {idp.issuer}
      jwks_uri: {idp.base}/jwks
      audiences: [shop]
      forward_claims: {{sub: x-user, email: x-user-email}}
  require:
    edge: {{issuers: [corp], paths: ["/api/*"]}}
authorization:
  edge: {{default: allow, paths_case: insensitive}}
""")
    server = xdsd()
    envoy_factory(server, "edge-1", "edge", mode=ADS)
    envoy_factory(server, "partner-1", "partner", mode=ADS)
    edge_client, partner_client = Client(f"http://127.0.0.1:{edge}/"), Client(f"http://127.0.0.1:{partner}/")
    token = idp.token(sub="alice", email="alice@example.com")
    wait_for(lambda: edge_client.get("/api/x", _bearer(token)).status == 200, 30, "edge verifies tokens")
    wait_for(lambda: partner_client.get("/x").status == 200, 30, "partner routes")
    forged = {"x-user": "admin", "x-user-email": "admin@example.com"}

    seen = partner_client.request("GET", "/admin", forged).json()["headers"]
    assert "x-user" not in seen and "x-user-email" not in seen, seen
    # partner verifies nothing: a valid token does not turn into claim headers there either.
    seen = partner_client.request("GET", "/admin", {**forged, **_bearer(token)}).json()["headers"]
    assert "x-user" not in seen and "x-user-email" not in seen, seen
    seen = edge_client.request("GET", "/public", forged).json()["headers"]
    assert "x-user" not in seen and "x-user-email" not in seen, seen
    seen = edge_client.request("GET", "/api/x", {**forged, **_bearer(token)}).json()["headers"]
    assert seen["x-user"] == "alice" and seen["x-user-email"] == "alice@example.com", seen

    # paths_case: insensitive: the required paths are too.
    for path in ("/API/x", "/Api/x", "/api/x"):
        resp = edge_client.request("GET", path)
        assert resp.status == 401 and b"Jwt is missing" in resp.body, (path, resp.status, resp.body)
    assert edge_client.request("GET", "/API/x", _bearer(token)).status == 200
