"""Authorization semantics, evaluated without Envoy: deny wins, then allow, then the default."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2

from xdsd.authz.servicer import AuthorizationServicer
from xdsd.model import load_mesh

MESH = load_mesh("""
mesh: {trust_domain: example.org}
services:
  reviews: {}
  productpage: {}
  ratings: {}
  open: {}
gateways:
  edge: {listen: {address: 127.0.0.1, port: 10000}, routes: [{prefix: /, service: productpage}]}
authorization:
  reviews:
    rules:
      - {name: pp-read, allow: {from: [productpage], methods: [get], paths: ["/reviews/*"]}}
      - {name: edge-health, allow: {from: [edge], paths: [/healthz]}}
      - {name: raw, allow: {from: ["spiffe://other.org/service/x"], headers: {X-Canary: "1"}}}
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: probe, dry_run: true, deny: {from: [productpage]}}
  productpage:
    default: allow
    rules:
      - {name: no-delete, deny: {methods: [DELETE]}}
""")

PP = "spiffe://example.org/service/productpage"


def check(service: str, principal: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[bool, str, tuple]:  # type: ignore[type-arg]
    s = AuthorizationServicer()
    s.set_mesh(MESH)
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.principal = principal
    a.context_extensions["xdsd.service"] = service
    a.request.http.method = method
    a.request.http.path = path
    a.request.http.headers.update(headers or {})
    _, d = s.decide(req)
    return d.allowed, d.rule, d.dry_run


def test_allow_rule_with_from_method_and_prefix() -> None:
    assert check("reviews", PP, "GET", "/reviews/1?x=1")[:2] == (True, "pp-read")
    assert check("reviews", PP, "POST", "/reviews/1")[:2] == (False, "default")
    assert check("reviews", PP, "GET", "/reviewsX")[:2] == (False, "default")
    assert check("reviews", "spiffe://example.org/service/ratings", "GET", "/reviews/1")[:2] == (False, "default")


def test_deny_wins_and_gateway_identities() -> None:
    assert check("reviews", PP, "GET", "/admin")[:2] == (False, "no-admin")
    assert check("reviews", "spiffe://example.org/gateway/edge", "GET", "/healthz")[:2] == (True, "edge-health")


def test_raw_principals_and_headers() -> None:
    assert check("reviews", "spiffe://other.org/service/x", "PUT", "/x", {"x-canary": "1"})[:2] == (True, "raw")
    assert check("reviews", "spiffe://other.org/service/x", "PUT", "/x", {"x-canary": "2"})[:2] == (False, "default")


def test_dry_run_is_reported_but_does_not_decide() -> None:
    allowed, rule, dry = check("reviews", PP, "GET", "/reviews/1")
    assert (allowed, rule) == (True, "pp-read") and dry == (("probe", False),)


def test_default_allow_and_services_without_policy() -> None:
    assert check("productpage", "", "GET", "/")[:2] == (True, "default")
    assert check("productpage", PP, "DELETE", "/")[:2] == (False, "no-delete")
    assert check("open", "", "DELETE", "/anything")[:2] == (True, "no-policy")


def test_a_gateway_policy_denies_with_403_and_unknown_destinations_are_errors() -> None:
    import pytest

    from xdsd.errors import MeshError

    mesh = load_mesh("""
services: {web: {}}
gateways:
  edge: {listen: {address: 127.0.0.1, port: 10000}, routes: [{prefix: /, service: web}]}
authorization:
  edge: {default: allow, rules: [{name: no-admin, deny: {paths: [/admin]}}]}
  web: {default: deny}
""")
    s = AuthorizationServicer()
    s.set_mesh(mesh)
    for destination, expected in (("edge", 403), ("web", 401)):
        req = external_auth_pb2.CheckRequest()
        req.attributes.context_extensions["xdsd.service"] = destination
        req.attributes.request.http.method = "GET"
        req.attributes.request.http.path = "/admin"
        _, decision = s.decide(req)
        assert not decision.allowed
        # No caller principal: at a gateway that is normal (403), inside the mesh it is not (401).
        assert s._response(decision, "").denied_response.status.code == expected
    with pytest.raises(MeshError) as err:
        load_mesh("services: {web: {}}\nauthorization: {nope: {default: deny}}\n")
    assert "authorization.nope: unknown service or gateway 'nope'" in str(err.value)


PATHS_MESH = load_mesh("""
mesh: {trust_domain: example.org}
services:
  reviews: {}
  orders: {}
  productpage: {}
  legacy: {}
authorization:
  reviews:
    default: allow
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: no-pp-orders, deny: {from: [productpage], paths: ["/orders-only/*"]}}
      - {name: no-export, dry_run: true, deny: {paths: [/export]}}
  orders:
    rules:
      - {name: health, allow: {paths: [/healthz]}}
      - {name: pp-api, allow: {from: [productpage], paths: ["/api/*"]}}
  legacy:
    default: allow
    paths_case: insensitive
    rules:
      - {name: no-admin, deny: {paths: [/Admin, "/admin/*"]}}
""")


def decide(service: str, path: str, principal: str = PP, method: str = "GET") -> tuple[bool, str]:
    s = AuthorizationServicer()
    s.set_mesh(PATHS_MESH)
    d = s.evaluate(service, principal, method, path, {})
    return d.allowed, d.rule


def test_path_parameters_do_not_get_past_a_deny_rule() -> None:
    for path in ["/admin;x", "/admin;x/y", "/x/..;/admin", "/..;/admin", "/admin;jsessionid=1", "/admin;/",
                 "/x/%2e%2e;/admin", "/%61dmin;x", "/admin%2F;x", "/admin;x?y", "//admin;x//y"]:
        assert decide("reviews", path) == (False, "no-admin"), path
    assert decide("reviews", "/orders-only;p/x") == (False, "no-pp-orders")
    assert decide("reviews", "/orders-only;p/x", principal="spiffe://example.org/service/orders") == (True, "default")
    # What a servlet serves as something else is not denied: /admin;x/.. is /, %3B is no parameter.
    assert decide("reviews", "/admin;x/../reviews") == (True, "default")
    assert decide("reviews", "/admin%3Bx") == (True, "default")


def test_a_path_read_two_ways_must_be_allowed_both_ways() -> None:
    # A servlet serves /admin/..;/public as /public; an app without path parameters serves it under
    # /admin/ (its "..;" is a name): denied, by the rule the second reading meets.
    assert decide("reviews", "/admin/..;/public") == (False, "no-admin")
    assert decide("orders", "/api/..;/secret") == (False, "default")
    assert decide("orders", "/api/1;v=2") == (True, "pp-api")  # parameters on a name: both readings allowed
    # An exact allow meets only the servlet reading: /healthz;x is another name to a plain app.
    assert decide("orders", "/healthz;x") == (False, "default")
    assert decide("orders", "/healthz") == (True, "health")


def test_exact_deny_paths_also_deny_with_a_trailing_slash_exact_allows_do_not_allow_it() -> None:
    mesh = load_mesh("""
services: {reviews: {}}
authorization:
  reviews:
    default: allow
    rules: [{name: no-admin, deny: {paths: [/admin, /ops/]}}]
""")
    s = AuthorizationServicer()
    s.set_mesh(mesh)
    for path, allowed in [("/admin", False), ("/admin/", False), ("/admin/.", False), ("/admin;x/", False),
                          ("/ops", False), ("/ops/", False), ("/admin/x", True), ("/adminx", True)]:
        assert s.evaluate("reviews", PP, "GET", path, {}).allowed is allowed, path
    assert decide("orders", "/healthz/") == (False, "default")


def test_paths_case_insensitive_compares_lower_cased_paths() -> None:
    for path in ["/ADMIN", "/admin", "/Admin/", "/aDmIn/x", "/%41dmin;x/y", "/x/..;/ADMIN"]:
        assert decide("legacy", path) == (False, "no-admin"), path
    assert decide("legacy", "/administrator") == (True, "default")
    # Case stays significant by default.
    assert decide("reviews", "/ADMIN") == (True, "default")
    assert decide("reviews", "/Admin/x") == (True, "default")


def test_dry_run_rules_see_the_normalized_path() -> None:
    s = AuthorizationServicer()
    s.set_mesh(PATHS_MESH)
    d = s.evaluate("reviews", PP, "GET", "/export;v=1", {})
    assert (d.allowed, d.rule, d.dry_run) == (True, "default", (("no-export", False),))


def test_options_star_and_paths_without_path_rules() -> None:
    assert decide("reviews", "*", method="OPTIONS") == (True, "default")
    assert decide("orders", "*", method="OPTIONS") == (False, "default")
    # A policy no rule of which looks at paths decides the same for any path, however odd.
    assert check("productpage", PP, "DELETE", "/x/..;/%zz\\y")[:2] == (False, "no-delete")
    assert check("productpage", PP, "GET", "/x/..;/%zz\\y")[:2] == (True, "default")
