"""Both servers of the xDS port (``xdsd serve --xds-transport h2|grpcio``) drive a real Envoy:
configuration, a change, TLS, and CSDS from a grpcio client, on each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from tests.support.certs import server_cert
from tests.support.envoy import EnvoyFactory
from tests.support.meshes import MeshFile, Mode, edge_mesh, mode_ids
from tests.support.procs import free_port, wait_for
from tests.support.traffic import send_requests
from tests.support.upstream import Upstreams
from tests.support.xdsd_proc import XdsdProcess

TRANSPORTS = ["h2", "grpcio"]
# One aggregated delta, one per-type state-of-the-world: between them, both protocols and both stream layouts.
BOTH_WAYS = [Mode(ads=True, delta=True), Mode(ads=False, delta=False)]


def _mesh(gw_port: int, app: tuple[str, int]) -> dict[str, object]:
    return edge_mesh(gw_port, [app], service="web")


def _app(url: str) -> str | None:
    return send_requests(url, 1)[0].app


@pytest.mark.parametrize("mode", BOTH_WAYS, ids=mode_ids(BOTH_WAYS))
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_envoy_is_configured_and_follows_a_change(
    transport: str, mode: Mode, mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams],
) -> None:
    ups = upstreams({"blue": "127.0.0.2", "green": "127.0.0.3"})
    gw_port = free_port()
    url = f"http://127.0.0.1:{gw_port}/x"
    mesh_file.write(_mesh(gw_port, ups.address("blue")))
    server = xdsd(extra_args=["--xds-transport", transport])
    envoy = envoy_factory(server, "edge-1", "edge", mode=mode)
    wait_for(lambda: _app(url) == "blue", f"traffic to blue over {transport}", 30)

    mesh_file.write(_mesh(gw_port, ups.address("green")))
    wait_for(lambda: _app(url) == "green", f"traffic to green after the edit over {transport}", 30)
    if mode.ads:
        assert envoy.stat("control_plane.connected_state") == 1

    # CSDS (a unary call from grpcio's client, with an operator token) on the same port reports the
    # node in sync.
    async with server.channel() as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        status = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=10,
                                              metadata=(("x-xdsd-token", server.operator_token()),))
    configs = {c.node.id: c for c in status.config}
    assert "edge-1" in configs
    assert {x.config_status for x in configs["edge-1"].generic_xds_configs} == {csds_pb2.SYNCED}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_xds_over_tls(
    transport: str, mesh_file: MeshFile, xdsd: Callable[..., XdsdProcess],
    envoy_factory: EnvoyFactory, upstreams: Callable[..., Upstreams], tmp_path: Path,
) -> None:
    ups = upstreams({"blue": "127.0.0.2"})
    gw_port = free_port()
    mesh_file.write(_mesh(gw_port, ups.address("blue")))
    cert, key, bundle = server_cert(tmp_path / "xds-tls")
    server = xdsd(extra_args=["--xds-transport", transport, "--xds-tls-cert", str(cert), "--xds-tls-key", str(key)])
    envoy = envoy_factory(server, "edge-1", "edge", xds_tls_ca=str(bundle))
    wait_for(lambda: _app(f"http://127.0.0.1:{gw_port}/x") == "blue", f"traffic over TLS xDS ({transport})", 30)
    assert envoy.stat("cluster.xds_cluster.ssl.handshake") >= 1
