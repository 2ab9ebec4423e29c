"""The path authorization rules see: what a servlet container (or a plain app) will serve for the
request path, whatever tricks the path plays; pure functions, checked by table and by property."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xdsd.authz.paths import authz_path, literal_path, readings, rule_path_problem
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.model import load_mesh

# (request path, authz_path, authz_path with case_insensitive)
CASES = [
    # the paths: path parameters are removed from every segment
    ("/admin;x", "/admin", "/admin"),
    ("/admin;x/y", "/admin/y", "/admin/y"),
    ("/orders-only;p/x", "/orders-only/x", "/orders-only/x"),
    ("/admin;jsessionid=1", "/admin", "/admin"),
    ("/admin;/", "/admin/", "/admin/"),
    ("/;x/admin", "/admin", "/admin"),
    # ...before dot segments are resolved (servlet order): "..;" is "..", "admin;x/.." is gone
    ("/x/..;/admin", "/admin", "/admin"),
    ("/..;/admin", "/admin", "/admin"),
    ("/x/..;x=1/admin", "/admin", "/admin"),
    ("/x/%2e%2e;/admin", "/admin", "/admin"),  # what Envoy forwards as /x/..;/admin
    ("/admin;x/../y", "/y", "/y"),
    ("/a/;/%2e%2e;/x", "/x", "/x"),  # "/a//../x": merged, then resolved
    # case
    ("/ADMIN", "/ADMIN", "/admin"),
    ("/Admin/%41", "/Admin/A", "/admin/a"),
    # escapes: ASCII decoded, so the same path has one spelling
    ("/%61dmin", "/admin", "/admin"),
    ("/adm%69n/x", "/admin/x", "/admin/x"),
    ("/a%21b", "/a!b", "/a!b"),
    ("/caf%c3%a9", "/caf%C3%A9", "/caf%c3%a9"),
    ("/caf\u00e9", "/caf%C3%A9", "/caf%c3%a9"),
    ("/caf\udce9", "/caf%E9", "/caf%e9"),  # an undecodable byte, as the HTTP transport passes it
    ("/100%", "/100%25", "/100%25"),
    ("/a%zz", "/a%25zz", "/a%25zz"),
    ("/%u002e%u002e/admin", "/%25u002e%25u002e/admin", "/%25u002e%25u002e/admin"),
    # ...but never into a separator, parameters, query, fragment or a new escape
    ("/admin%3bx", "/admin%3Bx", "/admin%3bx"),
    ("/x/..%3B/admin", "/x/..%3B/admin", "/x/..%3b/admin"),
    ("/admin%3fx", "/admin%3Fx", "/admin%3fx"),
    ("/admin%23x", "/admin%23x", "/admin%23x"),
    ("/a%252e%252e/admin", "/a%252e%252e/admin", "/a%252e%252e/admin"),
    ("/a%%32%65", "/a%252e", "/a%252e"),
    # dot segments, also escaped; never above the root
    ("/./admin", "/admin", "/admin"),
    ("/admin/.", "/admin/", "/admin/"),
    ("/admin/..", "/", "/"),
    ("/x/../admin", "/admin", "/admin"),
    ("/x/%2e%2e/admin", "/admin", "/admin"),
    ("/x/.%2E/admin", "/admin", "/admin"),
    ("/../../admin", "/admin", "/admin"),
    ("/a/.well-known/..x", "/a/.well-known/..x", "/a/.well-known/..x"),
    # separators: "//", "\", %2F, %5C
    ("//admin", "/admin", "/admin"),
    ("/admin//x//", "/admin/x/", "/admin/x/"),
    ("/admin%2fx", "/admin/x", "/admin/x"),
    ("/%2Fadmin", "/admin", "/admin"),
    ("/x\\..\\admin", "/admin", "/admin"),
    ("/x%5c..%5Cadmin", "/admin", "/admin"),
    # query and fragment
    ("/admin?x;y", "/admin", "/admin"),
    ("/admin#;x", "/admin", "/admin"),
    ("/admin#x?/../y", "/admin", "/admin"),
    ("/reviews/1?x=/../admin", "/reviews/1", "/reviews/1"),
    # targets that are not an origin-form path
    ("*", "*", "*"),
    ("*?x", "*", "*"),
    ("", "/", "/"),
    ("admin", "/admin", "/admin"),
    ("http://h/admin;x", "/admin", "/admin"),
    # already normal: unchanged
    ("/", "/", "/"),
    ("/reviews/1", "/reviews/1", "/reviews/1"),
    ("/admin/", "/admin/", "/admin/"),
]


@pytest.mark.parametrize(("path", "sensitive", "insensitive"), CASES, ids=[c[0] or "empty" for c in CASES])
def test_authz_path(path: str, sensitive: str, insensitive: str) -> None:
    assert authz_path(path) == sensitive
    assert authz_path(path, case_insensitive=True) == insensitive


@pytest.mark.parametrize(("path", "literal"), [
    ("/admin;x", "/admin;x"),
    ("/admin/..;/public", "/admin/..;/public"),  # ";" is an ordinary character: "..;" is a name
    ("/admin;x/../y", "/y"),
    ("/x/%2e%2e/admin", "/admin"),
    ("/Admin;X", "/Admin;X"),
])
def test_literal_path_keeps_parameters(path: str, literal: str) -> None:
    assert literal_path(path) == literal


def test_readings_are_one_unless_parameters_make_two() -> None:
    assert readings("/reviews/1") == ("/reviews/1",)
    assert readings("/reviews/1?a;b") == ("/reviews/1",)
    assert readings("/admin/..;/public") == ("/public", "/admin/..;/public")
    assert readings("/Admin;x", case_insensitive=True) == ("/admin", "/admin;x")


@pytest.mark.parametrize(("rule_path", "problem"), [
    ("/admin", None),
    ("/admin/*", None),
    ("/%61dmin", None),
    ("/caf\u00e9", None),
    ("/admin;x", "';' cannot appear"),
    ("/admin?x", "'?' cannot appear"),
    ("/a#b*", "'#' cannot appear"),
    ("/a\\b", "cannot appear"),
    ("/a//b", "'/a//b' is read as '/a/b'"),
    ("/a/./b", "'/a/./b' is read as '/a/b'"),
    ("/a/%2e%2e/b*", "'/a/%2e%2e/b*' is read as '/b*'"),
    ("/a/.*", "'/a/.*' is read as '/a/*'"),
])
def test_rule_paths_must_be_written_as_requests_are_read(rule_path: str, problem: str | None) -> None:
    found = rule_path_problem(rule_path)
    assert found == problem if problem is None else (found is not None and problem in found), found


# -- properties ------------------------------------------------------------------------------

# Pieces that path tricks are made of, and a few names; joined in any order.
ATOMS = ["/", "//", "\\", "admin", "ADMIN", "Admin", "%61dmin", "adm%49n", "x", ".", "..", "..;", ";", ";x=1",
         "%2e", "%2E", "%2f", "%2F", "%5c", "%3b", "%3B", "%25", "%", "%u002e", "?", "#", "*", "\u00e9", "\udcff",
         "%c3%a9", "http://h", "/admin", "/admin/", "/..;/", "/.;/", "/%2e%2e;/"]
tricky = st.lists(st.sampled_from(ATOMS), max_size=12).map("".join)
paths = st.one_of(st.text(max_size=40), tricky)


def _under_admin(path: str) -> bool:
    return path in ("/admin", "/admin/") or path.startswith("/admin/")


@settings(max_examples=1500, deadline=None)
@given(paths, st.booleans())
@example("/admin;x/../..;/admin", False)
@example("/%2e%2e;/ADMIN", True)
def test_the_normal_form_is_total_idempotent_and_clean(path: str, insensitive: bool) -> None:
    for read in (authz_path, literal_path):
        out = read(path, insensitive)
        assert read(out, insensitive) == out
        assert out == "*" or out.startswith("/")
        assert "//" not in out
        assert out == "*" or not {".", ".."} & set(out.split("/"))
        assert out.isascii()
    out = authz_path(path, insensitive)
    assert ";" not in out
    if insensitive:
        assert out == out.lower()


DENY_ADMIN = load_mesh("""
mesh: {trust_domain: example.org}
services: {reviews: {}}
authorization:
  reviews:
    default: allow
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
""")


@settings(max_examples=1500, deadline=None)
@given(paths)
@example("/x/..;/admin")
@example("/admin/..;/x")
@example("/admin;x/y")
@example("/ADMIN")
def test_nothing_that_reads_as_admin_is_allowed(path: str) -> None:
    s = AuthorizationServicer()
    s.set_mesh(DENY_ADMIN)
    decision = s.evaluate("reviews", "spiffe://example.org/service/x", "GET", path, {})
    # Denied exactly when some reading of the path is /admin or under it (and /ADMIN is not).
    assert decision.allowed == (not any(_under_admin(p) for p in readings(path))), readings(path)
    if _under_admin(authz_path(path)):
        assert not decision.allowed and decision.rule == "no-admin"
