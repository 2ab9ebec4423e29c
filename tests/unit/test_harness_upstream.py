"""The upstream app farm, traffic helpers, ports and polling, without xdsd or Envoy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port, free_ports, port_open
from tests.support.procs import Proc, ProcessExited, wait_for
from tests.support.traffic import SteadyTraffic, http_request, send_requests, share
from tests.support.upstream import Upstreams


def test_free_ports_are_distinct_and_work_on_other_loopback_addresses() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert not port_open("127.0.0.1", ports[0])
    assert free_port("127.0.0.3") not in ports
    with pytest.raises(ValueError):
        free_port("localhost")


def test_wait_for_accepts_both_argument_orders_and_names_what_timed_out() -> None:
    assert wait_for(lambda: 7, "seven", 1) == 7
    assert wait_for(lambda: 7, 1, "seven") == 7
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for nothing \(last value: 0\)"):
        wait_for(lambda: 0, 0.2, "nothing")
    with pytest.raises(AssertionError, match=r"waiting for boom \(last error: ValueError"):
        wait_for(lambda: int("x"), "boom", 0.2)


def test_a_dead_process_fails_the_wait_at_once(tmp_path: Path) -> None:
    proc = Proc("dies", [sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"], tmp_path / "dies.log").start()
    assert proc.popen is not None
    proc.popen.wait(30)  # it has exited: the next check says so
    checks = 0

    def check() -> bool:
        nonlocal checks
        checks += 1
        proc.check_alive()
        return False

    with pytest.raises(ProcessExited, match="dies exited with 3") as info:
        wait_for(check, "never", 30)
    assert checks == 1  # given up at the first check, not polled until the timeout
    assert "bye" in str(info.value)
    proc.stop()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The leader ignores SIGTERM and has a child: stop() escalates and takes the child too.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    log = tmp_path / "stubborn.log"
    proc = Proc("stubborn", [sys.executable, "-c", script], log).start()
    child_pid = int(wait_for(lambda: [ln for ln in log.read_text().splitlines() if ln.isdigit()][0], "child pid", 20))
    proc.stop(timeout=1)
    assert not proc.running
    # The child was in the group: it is gone (or a zombie about to be reaped by init).
    def child_gone() -> bool:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state == "Z"

    wait_for(child_gone, "the child to be killed", 10)


def test_upstream_apps_answer_and_obey_the_control_api(tmp_path: Path) -> None:
    with Upstreams({"alpha": "127.0.0.1", "beta": "127.0.0.2"}, tmp_path) as ups:
        results = send_requests(ups.url("alpha", "/some/path?q=1"), 5, headers={"x-test": "yes"})
        assert [tuple(r) for r in results] == [(200, "alpha")] * 5
        resp = http_request(ups.url("beta", "/x"), headers={"x-test": "yes"})
        assert resp.status == 200 and resp.headers["x-app"] == "beta"
        body = resp.json()
        assert body["app"] == "beta" and body["path"] == "/x" and body["headers"]["x-test"] == "yes"
        assert ups.stats("alpha") == 5 and ups.stats("beta") == 1

        ups.set("alpha", failure_rate=1.0, failure_status=502)
        assert {r.status for r in send_requests(ups.url("alpha"), 5)} == {502}
        assert send_requests(ups.url("alpha"), 1)[0].app == "alpha"  # the header still says who failed
        assert send_requests(ups.url("beta"), 1)[0].status == 200  # apps are independent

        ups.set("alpha", failure_rate=0.0, status=204)
        assert send_requests(ups.url("alpha"), 1)[0].status == 204

        ups.set("alpha", reset=True, latency_ms=300)
        t0 = time.monotonic()
        assert send_requests(ups.url("alpha"), 1)[0].status == 200
        assert time.monotonic() - t0 >= 0.3

        ups.reset()
        assert ups.all_stats() == {"alpha": 0, "beta": 0}
        host, port = ups.address("beta")
    assert not port_open(host, port)


def test_a_failed_connection_is_status_0_and_steady_traffic_reports_it(tmp_path: Path) -> None:
    port = free_port()
    assert [tuple(r) for r in send_requests(f"http://127.0.0.1:{port}/", 2, timeout=1)] == [(0, None)] * 2

    with Upstreams(["solo"], tmp_path) as ups:
        with SteadyTraffic(ups.url("solo"), interval=0.005) as traffic:
            traffic.wait_for_count(20, timeout=10)
        traffic.assert_no_failures(min_requests=20)
        assert share(traffic.results) == {"solo": 1.0}

        with SteadyTraffic(ups.url("solo"), interval=0.005) as traffic:
            traffic.wait_for_count(5, timeout=10)
            ups.stop()
            wait_for(lambda: traffic.failures(), "failures after the app stopped", 10)
    assert traffic.failures()[0].status == 0
    assert "failed" in traffic.summary()
    with pytest.raises(AssertionError):
        traffic.assert_no_failures()


def test_the_upstream_module_runs_standalone(tmp_path: Path) -> None:
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen([sys.executable, "-m", "tests.support.upstream", "--listen", f"only=127.0.0.1:{port}"],
                          cwd=root, stdout=subprocess.PIPE, start_new_session=True) as p:
        try:
            assert p.stdout is not None
            assert p.stdout.readline().startswith(b"ready")
            assert send_requests(f"http://127.0.0.1:{port}/", 1)[0].app == "only"
        finally:
            p.kill()
