"""``authentication:`` in the mesh: validation with field paths, the Envoy filters and clusters it
becomes, and end users in authorization decisions (claims from Envoy's dynamic metadata only)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.oauth2.v3 import oauth_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from xdsd import typeurls
from xdsd.authz.contract import JWT_METADATA_NAMESPACE, JWT_PAYLOAD_KEY
from xdsd.authz.servicer import NO_METADATA, AuthorizationServicer
from xdsd.errors import MeshError
from xdsd.generators import MeshGenerator, NodeGroup, generate
from xdsd.generators.authn import url_cluster, url_cluster_name
from xdsd.model import load_mesh
from xdsd.model.authentication import jwks_problem, path_regex
from xdsd.redact import MARKER, redacted

JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", "kid": "k1"}]})

BASE = """
services:
  web: {endpoints: [{address: 127.0.0.1, port: 8080}]}
  api:
    sidecar: {inbound: {address: 127.0.0.2, port: 15006}, app_port: 9000}
gateways:
  edge:
    listen: {address: 127.0.0.1, port: 10000}
    routes:
      - {prefix: /, service: web}
"""

AUTHN = f"""
authentication:
  issuers:
    corp:
      issuer: https://login.example.com
      jwks_uri: https://login.example.com/.well-known/jwks.json
      audiences: [shop]
      forward_claims: {{sub: x-user, email: x-user-email}}
    partner: {{issuer: https://partner.example, jwks: '{JWKS}'}}
  require:
    edge: {{issuers: [corp], paths: ["/api/*", /exact]}}
    api: {{issuers: [corp, partner]}}
authorization:
  edge:
    default: deny
    rules:
      - {{name: admins, allow: {{claims: {{groups: admins}}}}}}
      - {{name: banned, deny: {{claims: {{email: [mallory@example.com, eve@example.com]}}}}}}
      - {{name: alice, allow: {{request_principals: ["https://login.example.com/alice"], paths: [/me]}}}}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(MeshError) as exc:
        load_mesh(text)
    return [str(e) for e in exc.value.errors]


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("snippet", "expected"), [
    ("authentication: {issuers: {corp: {issuer: x, jwks_uri: 'ftp://x/keys'}}}",
     "authentication.issuers.corp.jwks_uri: 'ftp://x/keys' is not an http:// or https:// URL with a host"),
    ("authentication: {issuers: {corp: {issuer: x, jwks_uri: 'https://'}}}",
     "authentication.issuers.corp.jwks_uri: 'https://' is not an http:// or https:// URL with a host"),
    ("authentication: {issuers: {corp: {issuer: x, jwks_uri: 'https://bad_host!/k'}}}",
     "authentication.issuers.corp.jwks_uri:"),
    ("authentication: {issuers: {corp: {issuer: x, jwks: '{\"keys\": []}'}}}",
     "authentication.issuers.corp.jwks: a JSON Web Key Set needs a non-empty list 'keys'"),
    ("authentication: {issuers: {corp: {issuer: x, jwks: 'not json'}}}",
     "authentication.issuers.corp.jwks: not JSON"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}', audiences: []}}}}}}",
     "authentication.issuers.corp.audiences: give at least one audience, or leave audiences out to accept any"),
    ("authentication: {issuers: {corp: {issuer: x}}}",
     "authentication.issuers.corp: give exactly one of jwks_uri (fetched by Envoy) or jwks (inline keys)"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}'}}}}, require: {{edge: {{issuers: [corp, sso]}}}}}}",
     "authentication.require.edge.issuers[1]: unknown issuer 'sso' (known: corp)"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}'}}}}, require: {{web: {{issuers: [corp]}}}}}}",
     "authentication.require.web: service 'web' has no sidecar: nothing could check its requests' tokens"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}'}}}}, require: {{nope: {{issuers: [corp]}}}}}}",
     "authentication.require.nope: unknown gateway or service 'nope'"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}'}}}}, require: {{edge: {{issuers: [corp], paths: [api]}}}}}}",
     "authentication.require.edge.paths[0]: 'api': use an exact path, a prefix ending in '*', or '*'"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}', forward_claims: {{sub: X-User}}}}}}}}",
     "authentication.issuers.corp.forward_claims.sub: 'X-User' is not a lower-case HTTP header name"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}'}}}}, require: {{edge: {{issuers: [corp], "
     f"paths: [/{'/'.join(f'segment{i}' for i in range(12))}/*]}}}}}}",
     "authentication.require.edge.paths[0]: '/segment0/segment1/"),
    ("authentication: {issuers: {a: {issuer: x, jwks_uri: 'https://idp/k'}, "
     "b: {issuer: y, jwks_uri: 'https://idp/k2', ca_file: /ca.pem}}}",
     "authentication.issuers.b.ca_file: issuer 'a' reaches idp with ca_file None: give both the same"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}', forward_claims: {{sub: authorization}}}}}}}}",
     "authentication.issuers.corp.forward_claims: claim 'sub': 'authorization' cannot carry a claim"),
    (f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{JWKS}', forward_claims: {{sub: x-u, email: x-u}}}}}}}}",
     "authentication.issuers.corp.forward_claims: claims 'sub' and 'email' are both forwarded in 'x-u'"),
    ("authorization: {edge: {rules: [{name: a, allow: {claims: {groups: admins}}}]}}",
     "authorization.edge.rules[0].allow.claims: 'edge' verifies no tokens: add authentication.require.edge"),
])
def test_bad_authentication_is_refused_with_its_field_path(snippet: str, expected: str) -> None:
    errors = errors_of(BASE + snippet)
    assert any(e.startswith(expected) for e in errors), errors


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_anything_but_a_key_set_is_refused_as_inline_jwks(value: object) -> None:
    problem = jwks_problem(json.dumps(value))  # never raises, whatever the JSON
    if not isinstance(value, dict):
        assert problem is not None and "JSON Web Key Set" in problem
    elif not isinstance(value.get("keys"), list) or not value["keys"]:
        assert problem == "a JSON Web Key Set needs a non-empty list 'keys'"


@given(st.sampled_from(["kty", "crv", "x", "y"]))
def test_a_key_missing_a_member_is_refused(member: str) -> None:
    key = json.loads(JWKS)
    del key["keys"][0][member]
    assert jwks_problem(key) is not None
    assert jwks_problem(JWKS) is None


def test_a_login_needs_oidc_endpoints_and_a_readable_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    login = f"""
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes:
      - {{prefix: /app, service: web, login: {{issuer: corp, client_id: shop, client_secret_file: {secret}}}}}
services:
  web: {{endpoints: [{{address: 127.0.0.1, port: 8080}}]}}
authentication:
  issuers:
    corp: {{issuer: https://login.example.com, jwks: '{JWKS}'}}
"""
    assert any("gateways.edge.routes[0].login.issuer: issuer 'corp' has no authorization_endpoint" in e
               for e in errors_of(login))
    missing = login.replace(str(secret), str(tmp_path / "nope"))
    assert any(e.startswith("gateways.edge.routes[0].login.client_secret_file: cannot read") for e in errors_of(missing))
    ok = load_mesh(login.replace("jwks: ", "authorization_endpoint: https://login.example.com/auth, "
                                 "token_endpoint: https://login.example.com/token, jwks: "))
    route = ok.gateways["edge"].routes[0]
    assert route.login is not None and route.login.client_secret == "s3cret"
    assert "s3cret" not in repr(ok) and "s3cret" not in json.dumps(ok.model_dump(mode="json"))


# -- generation --------------------------------------------------------------------------------

def _filters(listener: object) -> list[hcm_pb2.HttpFilter]:
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)  # type: ignore[attr-defined]
    return list(hcm.http_filters)


def test_a_gateway_gets_jwt_authn_after_stripping_forwarded_headers_and_before_ext_authz() -> None:
    mesh = load_mesh(BASE + AUTHN)
    out = generate(mesh, NodeGroup("edge", authz_cluster="xdsd_authz"))
    filters = _filters(out[typeurls.LISTENER][0])
    assert [f.name for f in filters] == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
                                        "envoy.filters.http.ext_authz", "envoy.filters.http.fault",
                                        "envoy.filters.http.router"]
    jwt = jwt_pb2.JwtAuthentication()
    filters[1].typed_config.Unpack(jwt)
    corp = jwt.providers["corp"]
    assert corp.issuer == "https://login.example.com" and list(corp.audiences) == ["shop"]
    assert corp.payload_in_metadata == JWT_PAYLOAD_KEY
    assert {(c.claim_name, c.header_name) for c in corp.claim_to_headers} == {("sub", "x-user"), ("email", "x-user-email")}
    assert corp.remote_jwks.http_uri.cluster == "authn|https|login.example.com|443"
    assert corp.remote_jwks.cache_duration.seconds == 300
    assert [r.match.safe_regex.regex for r in jwt.rules[:2]] == [path_regex("/api/*"), path_regex("/exact")]
    assert jwt.rules[0].requires.provider_name == "corp"
    assert jwt.rules[2].match.prefix == "/"  # elsewhere: verified if sent, never required
    assert jwt.rules[2].requires.requires_any.requirements[-1].HasField("allow_missing_or_failed")
    # The policy reads claims: a gRPC check carrying the jwt_authn metadata, although the bootstrap
    # offers HTTP checks (they carry headers only).
    authz = ext_authz_pb2.ExtAuthz()
    filters[2].typed_config.Unpack(authz)
    assert authz.WhichOneof("services") == "grpc_service"
    assert list(authz.metadata_context_namespaces) == [JWT_METADATA_NAMESPACE]
    # jwt_authn's 403 (a wrong audience) is answered 401 like every other bad token; nothing else is.
    hcm = hcm_pb2.HttpConnectionManager()
    out[typeurls.LISTENER][0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    [mapper] = hcm.local_reply_config.mappers
    assert mapper.status_code.value == 401 and mapper.filter.extension_filter.name.endswith(".cel")
    plain = hcm_pb2.HttpConnectionManager()
    generate(load_mesh(BASE), NodeGroup("edge"))[typeurls.LISTENER][0].filter_chains[0].filters[0].typed_config.Unpack(plain)
    assert not plain.HasField("local_reply_config")
    # The JWKS cluster: TLS to the host, verified with the system's roots.
    jwks_cluster = next(c for c in out[typeurls.CLUSTER] if c.name.startswith("authn|"))
    tls = tls_pb2.UpstreamTlsContext()
    jwks_cluster.transport_socket.typed_config.Unpack(tls)
    validation = tls.common_tls_context.validation_context
    assert tls.sni == "login.example.com" and validation.trusted_ca.filename == "/etc/ssl/certs/ca-certificates.crt"
    assert [m.matcher.exact for m in validation.match_typed_subject_alt_names] == ["login.example.com"]
    # The inline issuer is not the gateway's: it has no provider there.
    assert set(jwt.providers) == {"corp"}


def test_a_sidecar_verifies_tokens_on_its_inbound_listener() -> None:
    mesh = load_mesh(BASE + AUTHN)
    out = generate(mesh, NodeGroup("api"))
    inbound = next(li for li in out[typeurls.LISTENER] if li.name.startswith("inbound|"))
    names = [f.name for f in _filters(inbound)]
    assert names[:2] == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn"]
    jwt = jwt_pb2.JwtAuthentication()
    _filters(inbound)[1].typed_config.Unpack(jwt)
    assert jwt.providers["partner"].local_jwks.inline_string == JWKS
    assert {r.provider_name for r in jwt.rules[0].requires.requires_any.requirements} == {"corp", "partner"}
    assert jwt.rules[0].match.safe_regex.regex == "/.*"
    assert any(c.name == "authn|https|login.example.com|443" for c in out[typeurls.CLUSTER])


@pytest.mark.parametrize(("rule", "path", "matches"), [
    ("/api/*", "/api/orders", True), ("/api/*", "/api;x/orders", True), ("/api/*", "/api", False),
    ("/api/*", "/apix/y", False), ("/exact", "/exact", True), ("/exact", "/exact;jsessionid=1", True),
    ("/exact", "/exact/", True), ("/exact", "/exactly", False), ("*", "/anything", True),
    ("/a.b/*", "/aXb/c", False),
])
def test_requirement_paths_cover_parameters(rule: str, path: str, matches: bool) -> None:
    assert bool(re.fullmatch(path_regex(rule), path)) is matches


def test_an_edit_of_authentication_takes_effect_and_login_secrets_go_over_sds_only(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("top-secret")
    gen = MeshGenerator()
    group = NodeGroup("edge")
    mesh = load_mesh(BASE + AUTHN)
    gen.begin(mesh)
    before = gen.generate(group)
    gen.end()
    edited = load_mesh(BASE + AUTHN.replace('paths: ["/api/*", /exact]', 'paths: ["/v2/*"]'))
    gen.begin(edited)
    after = gen.generate(group)
    gen.end()
    assert after[typeurls.LISTENER][0] != before[typeurls.LISTENER][0]
    jwt = jwt_pb2.JwtAuthentication()
    _filters(after[typeurls.LISTENER][0])[1].typed_config.Unpack(jwt)
    assert jwt.rules[0].match.safe_regex.regex == path_regex("/v2/*")

    with_login = load_mesh(BASE.replace("      - {prefix: /, service: web}", f"""      - prefix: /app
        service: web
        login: {{issuer: corp, client_id: shop, client_secret_file: {secret}, scopes: [openid, email]}}
      - {{prefix: /, service: web}}""") + AUTHN.replace(
        "      audiences: [shop]\n",
        "      audiences: [shop]\n      authorization_endpoint: https://login.example.com/auth\n"
        "      token_endpoint: https://login.example.com/token\n"))
    out = generate(with_login, group)
    listener = out[typeurls.LISTENER][0]
    assert b"top-secret" not in listener.SerializeToString()
    oauth = oauth_pb2.OAuth2()
    next(f for f in _filters(listener) if f.name == "envoy.filters.http.oauth2").typed_config.Unpack(oauth)
    creds = oauth.config.credentials
    assert creds.client_id == "shop"
    assert (creds.token_secret.name, creds.hmac_secret.name) == ("oauth2|edge|client", "oauth2|edge|hmac")
    assert list(oauth.config.auth_scopes) == ["openid", "email"]
    secrets = {s.name: s for s in out[typeurls.SECRET]}
    assert secrets["oauth2|edge|client"].generic_secret.secret.inline_string == "top-secret"
    assert len(secrets["oauth2|edge|hmac"].generic_secret.secret.inline_string) == 64
    shown = redacted(typeurls.SECRET, secrets["oauth2|edge|client"].SerializeToString())
    assert b"top-secret" not in shown and MARKER.encode() in shown


# -- authorization -----------------------------------------------------------------------------

def _check(servicer: AuthorizationServicer, path: str, payload: dict[str, object] | None) -> tuple[bool, str]:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.context_extensions["xdsd.service"] = "edge"
    a.request.http.method = "GET"
    a.request.http.path = path
    if payload is not None:
        s = struct_pb2.Struct()
        s.update({JWT_PAYLOAD_KEY: payload})
        a.metadata_context.filter_metadata[JWT_METADATA_NAMESPACE].CopyFrom(s)
    _, decision = servicer.decide(req)
    return decision.allowed, decision.rule


def test_claims_and_request_principals_decide_and_deny_wins() -> None:
    s = AuthorizationServicer()
    s.set_mesh(load_mesh(BASE + AUTHN))
    iss = "https://login.example.com"
    assert _check(s, "/x", {"iss": iss, "sub": "bob", "groups": ["users", "admins"]}) == (True, "admins")
    assert _check(s, "/x", {"iss": iss, "sub": "bob", "groups": "admins"}) == (True, "admins")
    assert _check(s, "/x", {"iss": iss, "sub": "bob", "groups": ["users"]}) == (False, "default")
    assert _check(s, "/x", None) == (False, "default")  # no token, no claims
    # At a gateway: 401 without a verified token (authenticate first), 403 with one.
    assert s.evaluate("edge", "", "GET", "/x", {}).forbidden is False
    assert s.evaluate("edge", "", "GET", "/x", {}, {"iss": iss, "sub": "bob"}).forbidden is True
    banned = {"iss": iss, "sub": "m", "groups": ["admins"], "email": "mallory@example.com"}
    assert _check(s, "/x", banned) == (False, "banned")  # deny wins over the admins allow
    assert _check(s, "/me", {"iss": iss, "sub": "alice"}) == (True, "alice")
    assert _check(s, "/me", {"iss": "https://partner.example", "sub": "alice"}) == (False, "default")
    # Numbers and booleans compare as their JSON text, in rules and in tokens alike.
    typed = load_mesh(BASE + AUTHN.replace("claims: {groups: admins}", "claims: {level: 3, staff: true}"))
    s.set_mesh(typed)
    assert typed.authorization["edge"].rules[0].allow.claims == {"level": "3", "staff": "true"}  # type: ignore[union-attr]
    assert _check(s, "/x", {"iss": iss, "sub": "b", "level": 3, "staff": True}) == (True, "admins")
    assert _check(s, "/x", {"iss": iss, "sub": "b", "level": 3, "staff": False}) == (False, "default")
    # An HTTP check cannot carry the verified payload: a policy on end users fails closed there.
    assert s.evaluate("edge", "", "GET", "/x", {"x-user": "alice"}, NO_METADATA).allowed is False


def test_readme_authentication_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### End-user authentication", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    secret = tmp_path / "shop-web.secret"
    secret.write_text("s")
    services = "services:\n  shop: {endpoints: [{address: 10.0.0.1, port: 80}]}\n" \
               "  shop-web: {endpoints: [{address: 10.0.0.2, port: 80}]}\n"
    mesh = load_mesh(services + block.replace("/etc/xdsd/shop-web.secret", str(secret)))
    assert mesh.authentication.require["edge"].issuers == ["corp"]
    out = generate(mesh, NodeGroup("edge"))
    assert {f.name for f in _filters(out[typeurls.LISTENER][0])} >= {
        "envoy.filters.http.oauth2", "envoy.filters.http.jwt_authn", "envoy.filters.http.ext_authz"}


def test_key_and_token_clusters_by_host() -> None:
    ip = url_cluster("https://10.0.0.7:8443/keys", "/etc/idp-ca.pem")
    assert ip.name == url_cluster_name("https://10.0.0.7:8443/other") == "authn|https|10.0.0.7|8443"
    assert ip.type == ip.STATIC and ip.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 8443
    tls = tls_pb2.UpstreamTlsContext()
    ip.transport_socket.typed_config.Unpack(tls)
    validation = tls.common_tls_context.validation_context
    assert not tls.sni and validation.trusted_ca.filename == "/etc/idp-ca.pem"
    assert [(m.san_type, m.matcher.exact) for m in validation.match_typed_subject_alt_names] == [(4, "10.0.0.7")]
    plain = url_cluster("http://idp.internal/keys")
    assert plain.type == plain.STRICT_DNS and not plain.HasField("transport_socket")
    assert plain.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 80


def test_a_registration_patches_a_gateway_with_key_clusters_like_a_full_generation() -> None:
    mesh = load_mesh(BASE + AUTHN)
    group = NodeGroup("edge")
    gen = MeshGenerator()
    gen.begin(mesh)
    gen.generate(group)
    gen.end()
    web = mesh.services["web"]
    moved = web.model_copy(update={"endpoints": [web.endpoints[0].model_copy(update={"port": 8081})]})
    registered = mesh.model_copy(update={"services": {**mesh.services, "web": moved}})
    gen.begin(registered, hint=(mesh, frozenset({"web"})))
    patched = gen.generate(group)
    gen.end()
    fresh = generate(registered, group)
    for type_url in fresh:
        assert [m.SerializeToString(deterministic=True) for m in fresh[type_url]] == [
            m.SerializeToString(deterministic=True) for m in patched[type_url]], type_url
    assert any(c.name.startswith("authn|") for c in patched[typeurls.CLUSTER])


@pytest.mark.parametrize(("key", "expected"), [
    ({"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}, "keys[0] (kid 'hs') is a symmetric key (kty 'oct')"),
    ({"kty": "oct", "k": "c2VjcmV0"}, "keys[0] is a symmetric key (kty 'oct')"),
    ({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB", "kid": "r1"}, "keys[0] (kid 'r1') holds private key material ('d')"),
    ({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "BBBB", "d": "CCCC"}, "keys[0] holds private key material ('d')"),
])
def test_inline_keys_that_could_sign_a_token_are_refused(key: dict[str, str], expected: str) -> None:
    """Inline keys are pushed in the listener and shown by every config view: a symmetric or private
    key there would let anyone who reads them mint tokens."""
    snippet = f"authentication: {{issuers: {{corp: {{issuer: x, jwks: '{json.dumps({'keys': [key]})}'}}}}}}"
    errors = errors_of(BASE + snippet)
    assert any(e.startswith(f"authentication.issuers.corp.jwks: {expected}") for e in errors), errors


@pytest.mark.parametrize(("paths_case", "path", "required"), [
    ("insensitive", "/API/orders", True), ("insensitive", "/Api;x/orders", True), ("insensitive", "/EXACT", True),
    ("insensitive", "/other", False), ("sensitive", "/API/orders", False), ("sensitive", "/api/orders", True),
])
def test_required_paths_follow_the_policys_paths_case(paths_case: str, path: str, required: bool) -> None:
    """An app that ignores case serves /API/x as /api/x: with ``paths_case: insensitive`` the token
    that /api/* needs is needed there too (Envoy's safe_regex is RE2, whose (?i) Python's re shares)."""
    mesh = load_mesh(BASE + AUTHN.replace("    default: deny\n", f"    default: deny\n    paths_case: {paths_case}\n"))
    assert mesh.authorization["edge"].paths_case == paths_case
    jwt = jwt_pb2.JwtAuthentication()
    _filters(generate(mesh, NodeGroup("edge", authz_cluster="xdsd_authz"))[typeurls.LISTENER][0])[1].typed_config.Unpack(jwt)
    first = next((r for r in jwt.rules if r.match.HasField("safe_regex") and re.fullmatch(r.match.safe_regex.regex, path)), None)
    assert (first is not None and first.requires.provider_name == "corp") is required


def _removed(listener: object) -> list[str]:
    strip = next((f for f in _filters(listener) if f.name == "envoy.filters.http.header_mutation"), None)
    if strip is None:
        return []
    config = header_mutation_pb2.HeaderMutation()
    strip.typed_config.Unpack(config)
    return [m.remove for m in config.mutations.request_mutations]


def test_every_gateway_and_inbound_listener_removes_every_issuers_claim_headers() -> None:
    """A gateway (or sidecar) that verifies no token must not pass a client's ``x-user`` to an app
    that another gateway's verified claims reach in that header."""
    mesh = load_mesh(BASE.replace("gateways:\n", "gateways:\n  partner:\n    listen: {address: 127.0.0.1, port: 10001}\n"
                                              "    routes: [{prefix: /, service: web}]\n") + AUTHN)
    assert "partner" not in mesh.authentication.require
    everyone = ["x-user", "x-user-email"]
    partner = generate(mesh, NodeGroup("partner"))[typeurls.LISTENER][0]
    assert _removed(partner) == everyone
    assert _filters(partner)[0].name == "envoy.filters.http.header_mutation"  # first, before anything reads them
    # api's sidecar verifies corp and partner (inline keys, no forwarded claims): still removes corp's headers.
    inbound = next(x for x in generate(mesh, NodeGroup("api"))[typeurls.LISTENER] if x.name.startswith("inbound"))
    assert _removed(inbound) == everyone
    assert _removed(generate(mesh, NodeGroup("edge", authz_cluster="xdsd_authz"))[typeurls.LISTENER][0]) == everyone
    # No issuer forwards a claim: nothing to remove, no filter.
    assert _removed(generate(load_mesh(BASE), NodeGroup("edge"))[typeurls.LISTENER][0]) == []


def _login_mesh(secret: Path) -> str:
    return f"""
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: 10000}}
    routes:
      - {{prefix: /app, service: web, login: {{issuer: corp, client_id: shop, client_secret_file: "{secret}"}}}}
services:
  web: {{endpoints: [{{address: 127.0.0.1, port: 8080}}]}}
authentication:
  issuers:
    corp: {{issuer: https://login.example.com, jwks: '{JWKS}', authorization_endpoint: https://login.example.com/auth,
            token_endpoint: https://attacker.example/token}}
"""


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    from xdsd.model.authentication import protect_secret_files

    state, password = tmp_path / "state", tmp_path / "etc" / "etcd.password"
    state.mkdir()
    password.parent.mkdir()
    (state / "token.key").write_text("dG9rZW4ta2V5LWJ5dGVz\n")
    password.write_text("etcd-pass\n")
    protect_secret_files([state, password])
    try:
        yield state, password
    finally:
        protect_secret_files([])


def test_a_client_secret_is_never_one_of_xdsds_files_or_a_key(protected: tuple[Path, Path], tmp_path: Path) -> None:
    """What client_secret_file names goes over SDS and then to the token endpoint the mesh names:
    never xdsd's state, keys or passwords, never a PEM key, only one line of text."""
    state, password = protected
    field = "gateways.edge.routes[0].login.client_secret_file: "
    (tmp_path / "link").symlink_to(password)
    os.link(state / "token.key", tmp_path / "hard")
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB0zb3J0LW9mLWEta2V5\n-----END EC PRIVATE KEY-----\n")
    lines = tmp_path / "lines"
    lines.write_text("first-line-secret\nsecond\n")
    for path, expected in [
        (state / "token.key", "is one of xdsd's own key, password or state files"),
        (state / ".." / "state" / "token.key", "is one of xdsd's own key, password or state files"),
        (password, "is one of xdsd's own key, password or state files"),
        (tmp_path / "link", "is one of xdsd's own key, password or state files"),
        (tmp_path / "hard", "has other hard links"),
        (pem, "holds a PEM block"),
        (lines, "holds several lines"),
    ]:
        errors = errors_of(_login_mesh(path))
        assert any(e.startswith(field) and expected in e for e in errors), (path, errors)
        assert not any(word in e for e in errors for word in ("etcd-pass", "dG9rZW4", "MHcCAQ", "second")), errors
    good = tmp_path / "client-secret"
    good.write_text("s3cret-value\n")
    login = load_mesh(_login_mesh(good)).gateways["edge"].routes[0].login
    assert login is not None and login.client_secret == "s3cret-value"


def test_serve_protects_its_state_dir_tls_ca_and_etcd_key_files(tmp_path: Path) -> None:
    from xdsd.cli import build_parser
    from xdsd.settings import ServeSettings

    for name in ("tls.key", "ca.key", "ca.pem", "etcd.key", "etcd.pem", "etcd.password"):
        (tmp_path / name).write_text("x\n")
    args = build_parser().parse_args([
        "serve", "--config", "mesh.yaml", "--state-dir", str(tmp_path / "state"), "--xds-tls-key", str(tmp_path / "tls.key"),
        "--ca-key", str(tmp_path / "ca.key"), "--store", "etcd://127.0.0.1:2379", "--etcd-cacert", str(tmp_path / "ca.pem"),
        "--etcd-cert", str(tmp_path / "etcd.pem"), "--etcd-key", str(tmp_path / "etcd.key"),
        "--etcd-user", "u", "--etcd-password-file", str(tmp_path / "etcd.password")])
    own = ServeSettings.from_args(args).own_secret_files()
    assert {str(p) for p in own} == {str(tmp_path / n) for n in ("state", "tls.key", "ca.key", "etcd.key", "etcd.password")}


@pytest.mark.parametrize("paths_case", ["sensitive", "insensitive"])
def test_a_login_guards_its_prefix_in_every_case_when_the_policy_ignores_case(paths_case: str, tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    mesh = load_mesh(_login_mesh(secret) + f"authorization:\n  edge: {{default: allow, paths_case: {paths_case}}}\n")
    oauth = next(f for f in _filters(generate(mesh, NodeGroup("edge"))[typeurls.LISTENER][0])
                 if f.name == "envoy.filters.http.oauth2")
    config = oauth_pb2.OAuth2()
    oauth.typed_config.Unpack(config)
    [matcher] = config.config.pass_through_matcher
    assert matcher.invert_match  # what the regex matches needs a login
    regex = matcher.string_match.safe_regex.regex
    assert re.fullmatch(regex, "/app/page") and not re.fullmatch(regex, "/other")
    assert bool(re.fullmatch(regex, "/APP/page")) is (paths_case == "insensitive")
