"""A gateway that has an authorization policy asks ext_authz for every request (fail closed); a
gateway without one does not. Real Envoy, real traffic."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.envoy import EnvoyFactory, EnvoyProcess
from tests.support.meshes import ADS, MeshFile
from tests.support.procs import free_port
from tests.support.traffic import Client
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

POLICY = """
authorization:
  edge:
    default: allow
    rules:
      - {name: no-admin, deny: {paths: [/admin, "/admin/*"]}}
      - {name: read-only, deny: {methods: [DELETE, PUT]}}
"""


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_gateway_with_a_policy_checks_every_request(
    mesh_file: MeshFile,
    xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory,
    upstreams: Callable[..., Upstreams],
    transport: str,
) -> None:
    ups = upstreams({"web": "127.0.0.2"})
    host, port = ups.address("web")
    edge, open_ = free_port(), free_port()
    mesh_file.write(f"""
services:
  web: {{endpoints: [{{address: {host}, port: {port}}}]}}
gateways:
  edge: {{listen: {{address: 127.0.0.1, port: {edge}}}, routes: [{{prefix: /, service: web}}]}}
  open: {{listen: {{address: 127.0.0.1, port: {open_}}}, routes: [{{prefix: /, service: web}}]}}
{POLICY}""")
    extra: list[str] = []
    bootstrap: dict[str, int] = {}
    if transport == "http":  # the checks go over HTTP/1.1 (xdsd serve --authz-http-address)
        authz_port = free_port()
        extra, bootstrap = ["--authz-http-address", f"127.0.0.1:{authz_port}"], {"authz_http_port": authz_port}
    server = xdsd(extra_args=extra)
    edge_envoy = envoy_factory(server, "edge-1", "edge", mode=ADS, **bootstrap)
    open_envoy = envoy_factory(server, "open-1", "open", mode=ADS, **bootstrap)
    edge_client, open_client = Client(f"http://127.0.0.1:{edge}/"), Client(f"http://127.0.0.1:{open_}/")
    edge_envoy.wait_for(lambda: edge_client.get("/x").status == 200, "edge gateway serves", 30)
    open_envoy.wait_for(lambda: open_client.get("/x").status == 200, "open gateway serves", 30)

    denied = edge_client.request("GET", "/admin/users")
    assert denied.status == 403  # forbidden, not 401: gateway callers carry no mesh identity
    assert denied.headers.get("x-xdsd-authz") == "deny; rule=no-admin"
    assert edge_client.request("GET", "//admin").status == 403  # normalized before the check
    assert edge_client.request("DELETE", "/x").status == 403
    assert edge_client.request("GET", "/reviews").status == 200
    assert open_client.request("GET", "/admin/users").status == 200  # no policy, no check

    def filters(envoy: EnvoyProcess) -> list[str]:
        dump = json.dumps(envoy.config_dump("dynamic_listeners"))
        return [f for f in ("envoy.filters.http.ext_authz",) if f in dump]

    assert filters(edge_envoy) == ["envoy.filters.http.ext_authz"]
    assert filters(open_envoy) == []
    assert 'xdsd_authz_decisions_total{outcome="deny",rule="no-admin",service="edge"}' in server.admin_get("/metrics")

    # Fail closed: with xdsd gone, the gateway that checks refuses; the other keeps serving.
    server.stop()
    edge_envoy.wait_for(lambda: edge_client.request("GET", "/x").status == 403, "fail closed", 30)
    assert open_client.request("GET", "/x").status == 200
