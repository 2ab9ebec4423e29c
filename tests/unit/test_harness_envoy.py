"""The Envoy harness with a purely static bootstrap (no xdsd): traffic and admin helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.envoy import EnvoyProcess, static_proxy_bootstrap
from tests.support.ports import free_port, port_open
from tests.support.procs import ProcessExited
from tests.support.traffic import SteadyTraffic, send_requests, share
from tests.support.upstream import Upstreams

pytestmark = pytest.mark.envoy


def test_static_envoy_proxies_to_an_upstream_app_and_exposes_its_admin_api(tmp_path: Path) -> None:
    with Upstreams({"backend": "127.0.0.2"}, tmp_path) as ups:
        listen_port, admin_port = free_port(), free_port()
        bootstrap = static_proxy_bootstrap(admin_port, listen_port, ups.address("backend"), cluster="backend")
        envoy = EnvoyProcess("static", bootstrap, tmp_path).start(timeout=30)
        try:
            url = f"http://127.0.0.1:{listen_port}/hello"
            results = send_requests(url, 20)
            assert {tuple(r) for r in results} == {(200, "backend")}
            assert share(results) == {"backend": 1.0}
            assert ups.stats("backend") == 20

            assert envoy.cluster_names() >= {"backend"}
            assert envoy.listener_names() == {"ingress"}
            assert envoy.endpoints_of("backend") == {f"127.0.0.2:{ups.port('backend')}": 1}
            dump = envoy.config_dump()
            types = {c["@type"].rsplit(".", 1)[-1] for c in dump["configs"]}
            assert {"BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump"} <= types
            static_clusters = envoy.config_dump("static_clusters")["configs"]
            assert [c["cluster"]["name"] for c in static_clusters] == ["backend"]

            envoy.wait_for(lambda: envoy.stat("cluster.backend.upstream_rq_200") >= 20, "upstream_rq_200 >= 20", 10)
            assert envoy.stat("no.such.stat") == 0

            # Upstream failures show through Envoy, and a steady stream sees them.
            ups.set("backend", failure_rate=1.0, failure_status=503)
            with SteadyTraffic(url, interval=0.005) as traffic:
                traffic.wait_for_count(5, timeout=10)
            assert traffic.failures() and {r.status for r in traffic.failures()} == {503}
            envoy.wait_for(lambda: envoy.stat("cluster.backend.upstream_rq_503") >= 5, 10, "upstream_rq_503 >= 5")
        finally:
            envoy.stop()
        assert not envoy.running
        assert not port_open("127.0.0.1", listen_port) and not port_open("127.0.0.1", admin_port)


def test_a_bad_bootstrap_fails_fast_with_the_envoy_log(tmp_path: Path) -> None:
    bootstrap = static_proxy_bootstrap(free_port(), free_port(), ("127.0.0.1", free_port()))
    bootstrap["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    with pytest.raises(ProcessExited, match=r"(?s)exited with.*NOT_A_TYPE"):
        EnvoyProcess("broken", bootstrap, tmp_path).start(timeout=30)
