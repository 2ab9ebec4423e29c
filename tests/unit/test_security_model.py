"""The security model is written down once and enforced: README's table of every method on every
port, the access tables in code, and what the running server actually registers agree; anything
not in the tables is refused; no view of a resource but SDS carries a private key."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from xdsd import typeurls
from xdsd.auth.access import Access
from xdsd.auth.methods import ADMIN_ROUTES, AUTHZ_HTTP_ROUTES, GRPC_METHODS, Rule, grpc_gate
from xdsd.auth.tokens import TokenSigner
from xdsd.redact import MARKER, redacted

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| (?P<port>[^|]+?) \| `(?P<what>[^`]+)` \| (?P<who>[^|]+?) \| (?P<how>[^|]*?) \|$")


def readme_table() -> dict[tuple[str, str], str]:
    """(port, method or route) -> who may call, from README's "Every method on every port"."""
    text = README.read_text()
    section = text.split("### Every method on every port", 1)[1].split("\n### ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in section.splitlines():
        m = _ROW.match(line)
        if m:
            key = (m["port"], m["what"])
            assert key not in rows, f"README lists {key} twice"
            rows[key] = m["who"]
    return rows


def code_table() -> dict[tuple[str, str], str]:
    rows = {("xDS (gRPC)", path.lstrip("/")): rule.value for path, rule in GRPC_METHODS.items()}
    rows |= {("admin (HTTP)", f"{method} {path}"): rule.value for (method, path), rule in ADMIN_ROUTES.items()}
    rows |= {("ext_authz (HTTP)", f"{method} {path}"): rule.value for (method, path), rule in AUTHZ_HTTP_ROUTES.items()}
    return rows


def test_readme_table_is_the_code_table() -> None:
    assert readme_table() == code_table()


def _serve_args(tmp_path: Path) -> object:
    from xdsd.cli import build_parser

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: {}\n")
    return build_parser().parse_args([
        "serve", "--config", str(mesh), "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state")])


async def test_every_registered_method_and_route_has_an_access_rule(tmp_path: Path) -> None:
    """Walks what a real App registers on its ports (not what the tables say): a method or route
    added without a rule fails here (and is refused by the server at run time)."""
    from xdsd.admin.http import make_app
    from xdsd.app import App
    from xdsd.registry.api import http_routes
    from xdsd.settings import ServeSettings

    app = App(ServeSettings.from_args(_serve_args(tmp_path)))  # type: ignore[arg-type]
    grpc_server, _ = await app._start_grpc()
    try:
        served = set(grpc_server.registered_methods())  # type: ignore[union-attr]
    finally:
        await grpc_server.stop(None)
    assert served, "no gRPC methods found"
    assert served == set(GRPC_METHODS), (served ^ set(GRPC_METHODS))
    admin = make_app(app.server, app.controller, app.metrics, lambda: True, access=app.access)
    admin.add_routes(http_routes(app.registry, app.access))
    routes = {(r.method, r.resource.canonical) for r in admin.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    assert routes == set(ADMIN_ROUTES), routes ^ set(ADMIN_ROUTES)


def test_the_gate_refuses_methods_without_a_rule_and_checks_tokens(tmp_path: Path) -> None:
    access = Access.from_state_dir(tmp_path)
    signer = TokenSigner.load_or_create(tmp_path)
    refused: list[str] = []
    gate = grpc_gate(access, lambda reason, message, peer, method: refused.append(reason))
    node = (("x-xdsd-token", signer.issue("n", "reviews")),)
    operator = (("x-xdsd-token", signer.operator()),)
    ads = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    csds = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus"
    assert gate("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", node, "p") == (
        grpc.StatusCode.PERMISSION_DENIED, "xdsd: no-rule: no access rule for /grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert gate(ads, node, "p") is None
    assert gate(ads, (), "p")[0] == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]
    assert gate(ads, operator, "p")[0] == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[index]
    assert gate(csds, operator, "p") is None
    assert gate(csds, node, "p")[0] == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[index]
    assert gate(csds, (("x-xdsd-token", "v2.a.b"),), "p")[0] == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]
    assert refused == ["no-rule", "missing-token", "not-a-node", "not-operator", "bad-token"]


def test_every_rule_is_used_and_named_in_readme() -> None:
    used = set(GRPC_METHODS.values()) | set(ADMIN_ROUTES.values()) | set(AUTHZ_HTTP_ROUTES.values())
    assert used == set(Rule)


def _secret() -> secret_pb2.Secret:
    s = secret_pb2.Secret(name="spiffe://td/service/reviews")
    s.tls_certificate.certificate_chain.inline_bytes = b"-----BEGIN CERTIFICATE-----\nabc\n"
    s.tls_certificate.private_key.inline_bytes = b"-----BEGIN PRIVATE KEY-----\nsecret\n"
    s.tls_certificate.password.inline_string = "hunter2"
    return s


def test_redacted_blanks_key_material_and_keeps_the_rest() -> None:
    body = redacted(typeurls.SECRET, _secret().SerializeToString())
    out = secret_pb2.Secret.FromString(body)
    assert b"PRIVATE KEY" not in body and b"hunter2" not in body
    assert out.tls_certificate.private_key.inline_string == MARKER
    assert out.tls_certificate.certificate_chain.inline_bytes.startswith(b"-----BEGIN CERTIFICATE")
    assert out.name == "spiffe://td/service/reviews"
    # Session ticket keys and generic secrets are key material too.
    s = secret_pb2.Secret(name="x")
    s.session_ticket_keys.keys.add(inline_bytes=b"K" * 80)
    assert b"K" * 80 not in redacted(typeurls.SECRET, s.SerializeToString())
    g = secret_pb2.Secret(name="y")
    g.generic_secret.secret.inline_string = "oauth-client-secret"
    assert b"oauth-client-secret" not in redacted(typeurls.SECRET, g.SerializeToString())
    # Other types pass through unchanged; a validation-context secret is unchanged.
    assert redacted(typeurls.CLUSTER, b"\x0a\x01x") == b"\x0a\x01x"
    v = secret_pb2.Secret(name="spiffe://td")
    v.validation_context.trusted_ca.inline_bytes = b"CA"
    assert redacted(typeurls.SECRET, v.SerializeToString()) == v.SerializeToString()


@pytest.mark.parametrize("peer,loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.9.9.9:1", True), ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", True), ("ipv4:192.0.2.2:5000", False), ("ipv6:[fd00::2]:1", False),
    ("unknown", False), ("", False),
])
def test_loopback_peers(peer: str, loopback: bool) -> None:
    from xdsd.server.xds import is_loopback_peer

    assert is_loopback_peer(peer) is loopback


def test_status_output_escapes_what_proxies_send() -> None:
    from xdsd.status import render_node, render_table

    nasty = "NACK \x1b[2J\x1b]52;c;ZXZpbA==\x07 row\rgone"
    proxy = {"node_id": "n\x1b[1A", "cluster": "edge", "protocol": "sotw", "transport": "ads", "peer": "ipv4:1.2.3.4:5",
             "types": {"CDS": {"state": "NACKED", "acked_version": "v\x1b[0m", "sent_version": "2",
                               "current_version": "2", "sent_nonce": "1", "acked_nonce": "1", "last_nack": nasty,
                               "nacked_version": "2"}}}
    for text in (render_table([proxy]), render_node(proxy)):
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text
        assert "\\x1b[2J" in text


def test_a_non_ascii_token_is_refused_and_counted(tmp_path: Path) -> None:
    access = Access.from_state_dir(tmp_path)
    refused: list[str] = []
    gate = grpc_gate(access, lambda reason, message, peer, method: refused.append(reason))
    ads = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    # HTTP/2 header values arrive as latin-1 text: the bytes of "v1.e30.é".
    code, _ = gate(ads, (("x-xdsd-token", "v1.e30.\xc3\xa9"),), "ipv4:1.2.3.4:5")  # type: ignore[misc]
    assert code == grpc.StatusCode.UNAUTHENTICATED and refused == ["bad-token"]


async def test_diff_needs_an_operator_token_even_on_a_loopback_admin_address(tmp_path: Path) -> None:
    """A diff imports processor modules, reads files, signs SVIDs and generates every group: like
    apply, never anonymous (the read-only debug pages stay open on loopback)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from xdsd.admin.http import access_middleware

    access = Access.from_state_dir(tmp_path)
    signer = TokenSigner.load_or_create(tmp_path)
    reached: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({})

    app = web.Application(middlewares=[access_middleware(access, debug_open=True)])
    app.router.add_post("/v1/config/diff", handler)
    app.router.add_get("/debug/config", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.post("/v1/config/diff", data=b"services: {}\n")).status == 401
        node = {"x-xdsd-token": signer.issue("n", "reviews")}
        assert (await client.post("/v1/config/diff", data=b"services: {}\n", headers=node)).status == 403
        assert reached == []
        assert (await client.get("/debug/config")).status == 200  # loopback: read-only pages stay open
        operator = {"x-xdsd-token": signer.operator()}
        assert (await client.post("/v1/config/diff", data=b"services: {}\n", headers=operator)).status == 200
    assert reached == ["/debug/config", "/v1/config/diff"]
