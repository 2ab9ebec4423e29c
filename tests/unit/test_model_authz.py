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
