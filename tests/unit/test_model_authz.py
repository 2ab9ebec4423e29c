"""Authorization header names: only those Envoy hands to the authorization service unchanged, over
either transport; the error names the field."""

from __future__ import annotations

import pytest

from xdsd.errors import MeshError
from xdsd.model import load_mesh


def _mesh(header: str) -> str:
    return f"""
services: {{reviews: {{}}}}
authorization:
  reviews:
    rules:
      - {{name: r, allow: {{headers: {{"{header}": v}}}}}}
"""


@pytest.mark.parametrize(("header", "why"), [
    ("host", "use ':authority'"),
    ("Content-Length", "without the body"),
    ("connection", "hop-by-hop"),
    ("X-Envoy-Internal", "Envoy sets x-envoy-*"),
    ("x-forwarded-client-cert", "use 'from'"),
    (":scheme", "pseudo-headers rules can match are :authority, :method, :path"),
    ("bad header", "not an HTTP header name"),
])
def test_unmatchable_headers_are_refused_with_the_field_path(header: str, why: str) -> None:
    with pytest.raises(MeshError) as err:
        load_mesh(_mesh(header))
    text = str(err.value)
    assert f"authorization.reviews.rules[0].allow.headers.{header}" in text and why in text, text


def test_names_are_lower_cased_and_pseudo_headers_allowed() -> None:
    mesh = load_mesh(_mesh("X-Tenant").replace("rules:", "rules:\n      - {name: p, allow: {headers: {':authority': a}}}"))
    rules = mesh.authorization["reviews"].rules
    assert list(rules[0].allow.headers) == [":authority"] and list(rules[1].allow.headers) == ["x-tenant"]


def _policy(extra: str) -> str:
    return f"""
services: {{reviews: {{}}}}
authorization:
  reviews:
{extra}
"""


@pytest.mark.parametrize("value", ["sensitive", "insensitive"])
def test_paths_case_takes_sensitive_or_insensitive(value: str) -> None:
    assert load_mesh(_policy(f"    paths_case: {value}")).authorization["reviews"].paths_case == value


def test_paths_case_defaults_to_sensitive() -> None:
    assert load_mesh(_policy("    default: allow")).authorization["reviews"].paths_case == "sensitive"


@pytest.mark.parametrize("value", ["Insensitive", "ignore", "true", "1", "[insensitive]"])
def test_paths_case_refuses_anything_else_with_the_field_path(value: str) -> None:
    with pytest.raises(MeshError) as err:
        load_mesh(_policy(f"    paths_case: {value}"))
    assert "authorization.reviews.paths_case: " in str(err.value) and "'insensitive'" in str(err.value), str(err.value)


@pytest.mark.parametrize(("path", "why"), [
    ("/admin;x", "';' cannot appear in a rule path"),
    ("/admin?x=1", "'?' cannot appear"),
    ("/a//b", "is read as '/a/b'"),
    ("/a/../admin/*", "is read as '/admin/*'"),
    ("/a/%2e/b", "is read as '/a/b'"),
])
def test_rule_paths_that_requests_never_have_are_refused(path: str, why: str) -> None:
    with pytest.raises(MeshError) as err:
        load_mesh(_policy(f'    rules: [{{name: r, deny: {{paths: [/ok, "{path}"]}}}}]'))
    text = str(err.value)
    assert "authorization.reviews.rules[0].deny.paths[1]: " in text and why in text, text


def test_other_spellings_of_a_rule_path_are_accepted() -> None:
    mesh = load_mesh(_policy('    rules: [{name: r, deny: {paths: ["/%61dmin", "/caf\\u00e9/*", "/100%"]}}]'))
    assert mesh.authorization["reviews"].rules[0].deny.paths == ["/%61dmin", "/caf\u00e9/*", "/100%"]
