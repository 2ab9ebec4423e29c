"""End-user authentication for a gateway or a sidecar's inbound listener (``mesh.authentication``):

- ``envoy.filters.http.header_mutation`` first: removes every header a verified claim is forwarded
  in (``forward_claims`` of every issuer, on every gateway and inbound listener, whichever issuers it
  verifies), so a client cannot send its own ``x-user``;
- ``envoy.filters.http.oauth2`` (gateways with a route ``login``): the OIDC authorization code flow,
  its client secret and HMAC key over SDS;
- ``envoy.filters.http.jwt_authn``: a token is required on the requirement's paths (a missing or
  invalid one is a 401 there); elsewhere a token is verified if sent but never required (an
  invalid one only yields no identity); the verified payload goes to dynamic
  metadata (``contract.JWT_METADATA_NAMESPACE`` / ``JWT_PAYLOAD_KEY``), where ext_authz reads it.

Plus the clusters Envoy fetches keys and tokens through (``url_cluster``). Pure functions of the model.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.oauth2.v3 import oauth_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2

from xdsd.authz.contract import JWT_PAYLOAD_KEY
from xdsd.generators.node import NodeGroup, config_source
from xdsd.generators.tls import TLS_SOCKET
from xdsd.model.authentication import Issuer, Login, Requirement, path_regex
from xdsd.model.fields import is_ip
from xdsd.model.mesh import Gateway, Mesh

JWT_FILTER = "envoy.filters.http.jwt_authn"
OAUTH2_FILTER = "envoy.filters.http.oauth2"
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
FETCH_TIMEOUT_S = 5
# After a failed JWKS fetch, Envoy tries again this soon.
FAILED_REFETCH_S = 1


def url_cluster_name(url: str) -> str:
    """One cluster per scheme, host and port that Envoy fetches from (JWKS, OIDC tokens)."""
    parts = urlsplit(url)
    return f"authn|{parts.scheme}|{parts.hostname}|{_port(url)}"


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


# Where Debian, Ubuntu, Alpine and Envoy's images keep the system's trust anchors.
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def url_cluster(url: str, ca_file: str | None = None) -> cluster_pb2.Cluster:
    """A cluster to the host of ``url``: when it is https, TLS with SNI, the server's certificate
    verified against ``ca_file`` (default the system's trust anchors) and the URL's host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    name = url_cluster_name(url)
    cluster = cluster_pb2.Cluster(name=name, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    cluster.type = cluster_pb2.Cluster.STATIC if is_ip(host) else cluster_pb2.Cluster.STRICT_DNS
    cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    cluster.connect_timeout.FromSeconds(FETCH_TIMEOUT_S)
    cluster.load_assignment.cluster_name = name
    sock = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sock.address = host
    sock.port_value = _port(url)
    if parts.scheme == "https":
        utc = tls_pb2.UpstreamTlsContext()
        if not is_ip(host):
            utc.sni = host
        validation = utc.common_tls_context.validation_context
        validation.trusted_ca.filename = ca_file or SYSTEM_CA_FILE
        if not is_ip(host):
            validation.match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.DNS).matcher.exact = host
        else:
            validation.match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS).matcher.exact = host
        cluster.transport_socket.name = TLS_SOCKET
        cluster.transport_socket.typed_config.Pack(utc)
    return cluster


def issuers_of(mesh: Mesh, name: str) -> list[tuple[str, Issuer]]:
    """The issuers whose tokens the gateway or service ``name`` verifies (its requirement's, and its
    login's), sorted by name."""
    auth = mesh.authentication
    names = set(auth.require[name].issuers) if name in auth.require else set()
    gateway = mesh.gateways.get(name)
    if gateway is not None:
        names |= {r.login.issuer for r in gateway.routes if r.login is not None}
    return [(n, auth.issuers[n]) for n in sorted(names) if n in auth.issuers]


def clusters_of(mesh: Mesh, name: str) -> list[cluster_pb2.Cluster]:
    """The clusters to the JWKS and token endpoints the node of ``name`` uses."""
    urls: dict[str, str | None] = {}  # url -> its issuer's ca_file
    for _, issuer in issuers_of(mesh, name):
        if issuer.jwks_uri is not None:
            urls[issuer.jwks_uri] = issuer.ca_file
    login = login_of(mesh.gateways.get(name))
    if login is not None:
        issuer = mesh.authentication.issuers[login[1].issuer]
        if issuer.token_endpoint is not None:
            urls[issuer.token_endpoint] = issuer.ca_file
    by_name = {url_cluster_name(u): u for u in sorted(urls)}
    return [url_cluster(by_name[n], urls[by_name[n]]) for n in sorted(by_name)]


def login_of(gateway: Gateway | None) -> tuple[str, Login] | None:
    """The route prefix and login of a gateway's one route with a login."""
    if gateway is None:
        return None
    for route in gateway.routes:
        if route.login is not None and route.prefix is not None:
            return route.prefix, route.login
    return None


# Envoy answers a token for another audience with 403 (authentic, but not for this service); the
# mesh answers it like every other token it cannot accept: 401, with Envoy's reason as the body. The
# listener's local reply mapper rewrites jwt_authn's 403 (and nothing else) by its response code details.
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
JWT_DENIED_AS_401 = 'response.code == 403 && response.code_details.startsWith("jwt_authn_access_denied")'


def audience_failure_as_401() -> hcm_pb2.ResponseMapper:
    mapper = hcm_pb2.ResponseMapper()
    ext = mapper.filter.extension_filter
    ext.name = CEL_FILTER
    ext.typed_config.Pack(cel_pb2.ExpressionFilter(expression=JWT_DENIED_AS_401))
    mapper.status_code.value = 401
    return mapper


def _requirement(providers: list[str], optional: bool) -> jwt_pb2.JwtRequirement:
    if len(providers) == 1 and not optional:
        return jwt_pb2.JwtRequirement(provider_name=providers[0])
    req = jwt_pb2.JwtRequirement()
    for p in providers:
        req.requires_any.requirements.add(provider_name=p)
    if optional:  # an opaque access token from a login must not fail a request that needs none
        req.requires_any.requirements.add().allow_missing_or_failed.SetInParent()
    return req


def _provider(issuer: Issuer) -> jwt_pb2.JwtProvider:
    # forward: the token travels on (a sidecar behind the gateway verifies it again).
    provider = jwt_pb2.JwtProvider(issuer=issuer.issuer, payload_in_metadata=JWT_PAYLOAD_KEY, forward=True)
    provider.audiences.extend(issuer.audiences or [])
    if issuer.jwks_uri is not None:
        remote = provider.remote_jwks
        remote.http_uri.uri = issuer.jwks_uri
        remote.http_uri.cluster = url_cluster_name(issuer.jwks_uri)
        remote.http_uri.timeout.FromSeconds(FETCH_TIMEOUT_S)
        remote.cache_duration.FromNanoseconds(int(round(issuer.jwks_cache_duration * 1e9)))
        # Fetched when the listener is built, not on the first request; retried soon after a failure.
        remote.async_fetch.failed_refetch_duration.FromSeconds(FAILED_REFETCH_S)
    else:
        assert issuer.jwks is not None
        provider.local_jwks.inline_string = issuer.jwks
    for claim, header in sorted(issuer.forward_claims.items()):
        provider.claim_to_headers.add(claim_name=claim, header_name=header)
    return provider


def _case_flags(mesh: Mesh, name: str) -> str:
    """``(?i)`` (RE2) when ``name``'s policy says its app ignores case (``paths_case: insensitive``):
    a path that must carry a token or a login then does in every case (``/API/x`` as ``/api/x``)."""
    policy = mesh.authorization.get(name)
    return "(?i)" if policy is not None and policy.paths_case == "insensitive" else ""


def jwt_filter(mesh: Mesh, name: str, requirement: Requirement | None) -> hcm_pb2.HttpFilter | None:
    """``jwt_authn`` for the gateway or service ``name``: a token from one of the requirement's
    issuers on its paths; elsewhere a token is verified if sent, never required. When ``name``'s
    policy says ``paths_case: insensitive`` (an app that ignores case), so do the required paths:
    ``/API/x`` needs the token ``/api/*`` needs."""
    issuers = issuers_of(mesh, name)
    if not issuers:
        return None
    config = jwt_pb2.JwtAuthentication()
    for issuer_name, issuer in issuers:
        config.providers[issuer_name].CopyFrom(_provider(issuer))
    all_names = [n for n, _ in issuers]
    if requirement is not None:
        required = _requirement(sorted(requirement.issuers), optional=False)
        flags = _case_flags(mesh, name)
        for path in requirement.paths:
            rule = config.rules.add()
            rule.match.safe_regex.regex = flags + path_regex(path)
            rule.requires.CopyFrom(required)
    rest = config.rules.add()
    rest.match.prefix = "/"
    rest.requires.CopyFrom(_requirement(all_names, optional=True))
    f = hcm_pb2.HttpFilter(name=JWT_FILTER)
    f.typed_config.Pack(config)
    return f


def forwarded_headers(mesh: Mesh) -> list[str]:
    """Every header any issuer forwards a claim in. Every gateway and every sidecar's inbound
    listener removes a client's copies of all of them, not only of the issuers it verifies itself:
    an app reached through a gateway (or from a mesh peer) that verifies no token must never read a
    client's ``x-user`` as a verified claim. A listener that verifies an issuer sets its headers
    again from the verified token (``jwt_authn`` runs after the removal)."""
    return sorted({h for issuer in mesh.authentication.issuers.values() for h in issuer.forward_claims.values()})


def strip_filter(headers: list[str]) -> hcm_pb2.HttpFilter | None:
    """Removes the client's copies of the headers verified claims travel in."""
    if not headers:
        return None
    config = header_mutation_pb2.HeaderMutation()
    for h in headers:
        config.mutations.request_mutations.add().remove = h
    f = hcm_pb2.HttpFilter(name=HEADER_MUTATION_FILTER)
    f.typed_config.Pack(config)
    return f


def client_secret_name(gateway: str) -> str:
    return f"oauth2|{gateway}|client"


def hmac_secret_name(gateway: str) -> str:
    return f"oauth2|{gateway}|hmac"


def oauth2_filter(mesh: Mesh, gateway_name: str, group: NodeGroup) -> hcm_pb2.HttpFilter | None:
    """The OIDC code flow for the gateway's route with a ``login``; every other path passes through."""
    found = login_of(mesh.gateways.get(gateway_name))
    if found is None:
        return None
    prefix, login = found
    issuer = mesh.authentication.issuers[login.issuer]
    assert issuer.token_endpoint is not None and issuer.authorization_endpoint is not None
    config = oauth_pb2.OAuth2()
    c = config.config
    c.token_endpoint.uri = issuer.token_endpoint
    c.token_endpoint.cluster = url_cluster_name(issuer.token_endpoint)
    c.token_endpoint.timeout.FromSeconds(FETCH_TIMEOUT_S)
    c.authorization_endpoint = issuer.authorization_endpoint
    if issuer.end_session_endpoint is not None:
        c.end_session_endpoint = issuer.end_session_endpoint
    c.redirect_uri = "%REQ(x-forwarded-proto)%://%REQ(:authority)%" + login.redirect_path
    c.redirect_path_matcher.path.exact = login.redirect_path
    c.signout_path.path.exact = login.signout_path
    c.auth_scopes.extend(login.scopes)
    c.forward_bearer_token = True
    creds = c.credentials
    creds.client_id = login.client_id
    for secret, name in ((creds.token_secret, client_secret_name(gateway_name)),
                         (creds.hmac_secret, hmac_secret_name(gateway_name))):
        secret.name = name
        secret.sds_config.CopyFrom(config_source(group))
    # Only the login's prefix (and its callback and sign-out paths) needs a logged-in browser.
    guarded = "|".join(re.escape(p) for p in (login.redirect_path, login.signout_path)) + "|" + re.escape(prefix)
    passthrough = c.pass_through_matcher.add(name=":path", invert_match=True)
    passthrough.string_match.safe_regex.regex = _case_flags(mesh, gateway_name) + f"(?:{guarded}).*"
    f = hcm_pb2.HttpFilter(name=OAUTH2_FILTER)
    f.typed_config.Pack(config)
    return f


def login_secrets(mesh: Mesh, gateway_name: str) -> list[secret_pb2.Secret]:
    """The login's client secret, and the key its cookies are signed with: derived from the client
    secret, so every replica (and a restarted xdsd) signs alike and a new client secret logs everyone out."""
    found = login_of(mesh.gateways.get(gateway_name))
    if found is None:
        return []
    login = found[1]
    client = secret_pb2.Secret(name=client_secret_name(gateway_name))
    client.generic_secret.secret.inline_string = login.client_secret
    key = hmac.new(login.client_secret.encode(), f"xdsd oauth2 cookies|{gateway_name}|{login.client_id}".encode(),
                   hashlib.sha256).hexdigest()
    signing = secret_pb2.Secret(name=hmac_secret_name(gateway_name))
    signing.generic_secret.secret.inline_string = key
    return [client, signing]


def filters(mesh: Mesh, name: str, group: NodeGroup) -> list[hcm_pb2.HttpFilter]:
    """The authentication filters of the gateway or service ``name``, in order (before ext_authz)."""
    requirement = mesh.authentication.require.get(name)
    found = [
        strip_filter(forwarded_headers(mesh)),
        oauth2_filter(mesh, name, group) if name in mesh.gateways else None,
        jwt_filter(mesh, name, requirement),
    ]
    return [f for f in found if f is not None]

