"""``--store`` and the etcd options: parsed once, bad input refused with the flag named; the
bootstrap's xDS cluster with several replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsd.bootstrap import BootstrapOptions, render
from xdsd.cli import build_parser
from xdsd.settings import ServeSettings
from xdsd.store.keys import Keys
from xdsd.store.spec import StoreSpecError, grpc_target, parse_endpoints, store_from_args


def test_file_is_the_default_and_needs_config() -> None:
    args = build_parser().parse_args(["serve", "--config", "mesh.yaml"])
    assert ServeSettings.from_args(args).store.kind == "file"
    with pytest.raises(SystemExit, match="--config is required"):
        ServeSettings.from_args(build_parser().parse_args(["serve"]))


def test_etcd_store_with_prefix_and_no_config() -> None:
    args = build_parser().parse_args(["serve", "--store", "etcd://127.0.0.1:2379,127.0.0.2:2379", "--etcd-prefix", "/mesh2"])
    s = ServeSettings.from_args(args)
    assert s.config is None and s.store.etcd and s.store.prefix == "/mesh2"
    assert s.store.endpoints == (("127.0.0.1", 2379), ("127.0.0.2", 2379))
    assert grpc_target(s.store.endpoints) == "ipv4:127.0.0.1:2379,127.0.0.2:2379"
    assert Keys("/mesh2").registration("reviews", "10.0.0.1:80") == b"/mesh2/registrations/reviews/10.0.0.1:80"


@pytest.mark.parametrize(("argv", "message"), [
    (["--store", "etcd:/x"], "--store: expected 'file' or etcd://"),
    (["--store", "etcd://host"], "expected HOST:PORT"),
    (["--store", "etcd://h:99999"], "expected HOST:PORT"),
    (["--store", "etcd://h:1", "--etcd-prefix", "xdsd"], "--etcd-prefix"),
    (["--store", "etcd://h:1", "--etcd-cert", "/etc/hostname"], "--etcd-cert and --etcd-key go together"),
    (["--store", "etcd://h:1", "--etcd-user", "u"], "--etcd-user and --etcd-password-file go together"),
    (["--store", "etcd://h:1", "--etcd-cacert", "/nonexistent.pem"], "--etcd-cacert: /nonexistent.pem"),
])
def test_bad_store_options_are_refused_naming_the_flag(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["serve", *argv])
    with pytest.raises(StoreSpecError, match=message.replace("?", r"\?").replace("(", r"\(")):
        store_from_args(args)


def test_several_dns_names_are_refused_one_is_resolved_by_grpc() -> None:
    assert grpc_target(parse_endpoints("etcd://etcd.internal:2379")) == "dns:///etcd.internal:2379"
    with pytest.raises(StoreSpecError, match="IP addresses, or one DNS name"):
        grpc_target(parse_endpoints("etcd://a.internal:2379,b.internal:2379"))


def test_bootstrap_reaches_every_replica(tmp_path: Path) -> None:
    one = render(BootstrapOptions("n", "edge", xds_plaintext=True))
    many = render(BootstrapOptions("n", "edge", xds_plaintext=True, xds_more=(("127.0.0.2", 18000), ("127.0.0.3", 18001))))
    (cluster,) = [c for c in many["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    addrs = [e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [(a["address"], a["port_value"]) for a in addrs] == [("127.0.0.1", 18000), ("127.0.0.2", 18000), ("127.0.0.3", 18001)]
    assert cluster["type"] == "STATIC" and cluster["outlier_detection"]["consecutive_local_origin_failure"] == 1
    (single,) = [c for c in one["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    assert "outlier_detection" not in single  # one replica: the bootstrap is as before
    args = build_parser().parse_args(["bootstrap", "--node-id", "n", "--cluster", "c", "--xds-address", "a:1",
                                      "--xds-address", "b:2"])
    assert args.xds_address == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("store", ["etcd://10.0.0.5:2379", "etcd://127.0.0.1:2379,10.0.0.5:2379",
                                   "etcd://etcd.internal:2379", "etcd://[fd00::5]:2379"])
def test_a_remote_etcd_needs_tls_or_an_explicit_plaintext_flag(store: str) -> None:
    """The CA root key, the token key and the etcd password must not cross a network in clear by default."""
    with pytest.raises(StoreSpecError, match="is not on loopback: give --etcd-cacert"):
        store_from_args(build_parser().parse_args(["serve", "--store", store]))
    assert store_from_args(build_parser().parse_args(["serve", "--store", store, "--etcd-plaintext"])).etcd
    assert store_from_args(build_parser().parse_args(["serve", "--store", store, "--etcd-cacert", "/etc/hostname"])).etcd


@pytest.mark.parametrize("store", ["etcd://127.0.0.1:2379,127.0.0.2:2379", "etcd://localhost:2379", "etcd://[::1]:2379"])
def test_a_loopback_etcd_may_be_plaintext(store: str) -> None:
    assert store_from_args(build_parser().parse_args(["serve", "--store", store])).etcd
