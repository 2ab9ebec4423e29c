"""`xdsd bootstrap` and `xdsd token` through the CLI, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xdsd.auth import ledger
from xdsd.auth.tokens import TokenSigner
from xdsd.bootstrap import BootstrapOptions, render

ROOT = Path(__file__).resolve().parents[2]


def xdsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsd", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _tls(cluster: dict) -> dict:  # type: ignore[type-arg]
    return cluster["transport_socket"]["typed_config"]


def test_bootstrap_embeds_the_token_and_the_ca_and_verifies_xdsd_by_name(tmp_path: Path) -> None:
    out = xdsd("bootstrap", "--node-id", "reviews-7", "--cluster", "reviews", "--state-dir", str(tmp_path),
               "--ttl", "30d", "--authz-http-port", "18001")
    assert out.returncode == 0, out.stderr
    assert "expires" in out.stderr and "reviews-7" in out.stderr
    boot = yaml.safe_load(out.stdout)
    xds, authz = boot["static_resources"]["clusters"]
    token = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0]["value"]
    claims = TokenSigner.load_or_create(tmp_path).verify(token)
    assert (claims.node_id, claims.cluster) == ("reviews-7", "reviews")
    assert 29 * 86400 < claims.expires_at - claims.issued_at <= 30 * 86400
    for cluster in (xds, authz):
        tls = _tls(cluster)
        validation = tls["common_tls_context"]["validation_context"]
        assert "BEGIN CERTIFICATE" in validation["trusted_ca"]["inline_string"]
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "xdsd"}}]
        assert tls["sni"] == "xdsd"
        filters = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
        header = filters[0]["typed_config"]["mutations"]["request_mutations"][0]["append"]["header"]
        assert header == {"key": "x-xdsd-token", "value": token}  # every ext_authz check carries it
    assert [r["id"] for r in ledger.issued(tmp_path)] == [claims.token_id]


def _token_of(source: dict) -> str | None:  # type: ignore[type-arg]
    metadata = source["grpc_services"][0].get("initial_metadata", [])
    return metadata[0]["value"] if metadata else None


def test_bootstrap_flags_shape_the_output(tmp_path: Path) -> None:
    """Each flag of `xdsd bootstrap`, through the CLI: the fetch mode, the format, the token, TLS
    to xdsd, the sidecar's addresses, the zone and the admin address."""
    out = xdsd("bootstrap", "--node-id", "reviews-7", "--cluster", "reviews", "--no-ads", "--delta",
               "--format", "json", "--token", "v2.given.token", "--xds-address", "10.0.0.9:18100",
               "--xds-tls-ca", "/etc/xdsd/ca.pem", "--xds-tls-server-name", "xdsd.internal",
               "--inbound-address", "10.0.0.7", "--app-address", "10.0.0.8", "--zone", "zone-b",
               "--admin-address", "0.0.0.0", "--admin-port", "9911", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    boot = json.loads(out.stdout)  # --format json
    node = boot["node"]
    assert (node["id"], node["cluster"], node["locality"]) == ("reviews-7", "reviews", {"zone": "zone-b"})
    assert node["metadata"] == {"xdsd.admin_address": "127.0.0.1:9911", "xdsd.inbound_address": "10.0.0.7",
                                "xdsd.app_address": "10.0.0.8", "xdsd.authz_cluster": "xdsd_authz"}
    assert boot["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9911}
    dynamic = boot["dynamic_resources"]
    assert "ads_config" not in dynamic  # --no-ads: the per-type services, each its own source
    for source in (dynamic["cds_config"]["api_config_source"], dynamic["lds_config"]["api_config_source"]):
        assert source["api_type"] == "DELTA_GRPC"  # --delta
        assert _token_of(source) == "v2.given.token"  # --token: sent as given, nothing minted
    xds, authz = boot["static_resources"]["clusters"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (endpoint["address"], endpoint["port_value"]) == ("10.0.0.9", 18100)
    # ext_authz over HTTP/1.1 by default: the xDS host, port 18001 (xdsd serve's default)
    endpoint = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (authz["name"], endpoint["address"], endpoint["port_value"]) == ("xdsd_authz", "10.0.0.9", 18001)
    tls = _tls(xds)
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/xdsd/ca.pem"}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "xdsd.internal"}}]
    assert tls["sni"] == "xdsd.internal"
    assert ledger.issued(tmp_path) == []  # nothing was minted


def test_bootstrap_without_a_token_or_tls(tmp_path: Path) -> None:
    out = xdsd("bootstrap", "--node-id", "edge-1", "--cluster", "edge", "--no-token", "--xds-plaintext",
               "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    boot = yaml.safe_load(out.stdout)  # YAML by default
    assert _token_of(boot["dynamic_resources"]["ads_config"]) is None
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert "transport_socket" not in boot["static_resources"]["clusters"][0]
    assert "locality" not in boot["node"]
    assert ledger.issued(tmp_path) == []


def test_bootstrap_asks_authz_over_grpc_when_told(tmp_path: Path) -> None:
    out = xdsd("bootstrap", "--node-id", "n", "--cluster", "c", "--authz-grpc", "--no-token", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (xds,) = yaml.safe_load(out.stdout)["static_resources"]["clusters"]  # no xdsd_authz: checks ride the xDS cluster
    assert xds["name"] == "xds_cluster"


@pytest.mark.parametrize("args", [
    ["--cluster", "c", "--authz-grpc", "--authz-http-port", "18002"],
    ["--cluster", "c", "--token", "t", "--no-token"],
    ["--cluster", "c", "--format", "toml"],
    [],  # no --cluster
], ids=["grpc-and-http-authz", "token-and-no-token", "unknown-format", "no-cluster"])
def test_bootstrap_refuses_contradictions_and_gaps(args: list[str], tmp_path: Path) -> None:
    out = xdsd("bootstrap", "--node-id", "n", *args, "--state-dir", str(tmp_path))
    assert out.returncode == 2, out.stdout


def test_plaintext_and_operator_ca_bootstraps() -> None:
    plain = render(BootstrapOptions("n", "c", xds_plaintext=True))
    assert "transport_socket" not in plain["static_resources"]["clusters"][0]
    own = render(BootstrapOptions("n", "c", xds_host="10.0.0.9", xds_tls_ca="/etc/xdsd/ca.pem"))
    validation = _tls(own["static_resources"]["clusters"][0])["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/xdsd/ca.pem"}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.9"}}]
    named = render(BootstrapOptions("n", "c", xds_host="xdsd.internal", xds_tls_ca="/ca.pem"))
    assert _tls(named["static_resources"]["clusters"][0])["sni"] == "xdsd.internal"


def test_token_commands(tmp_path: Path) -> None:
    state = str(tmp_path)
    minted = xdsd("token", "--node-id", "vm-1", "--cluster", "reviews", "--ttl", "1h", "--state-dir", state)
    assert minted.returncode == 0 and minted.stdout.startswith("v2.") and "expires" in minted.stderr
    token_id = minted.stderr.split("token ", 1)[1].split(" ", 1)[0]
    op = xdsd("token", "--operator", "--state-dir", state)
    assert op.returncode == 0 and TokenSigner.load_or_create(tmp_path).verify(op.stdout.strip()).kind == "operator"
    listed = xdsd("token", "list", "--state-dir", state)
    assert token_id in listed.stdout and "operator" in listed.stdout and minted.stdout.strip() not in listed.stdout
    assert xdsd("token", "revoke", "--id", token_id, "--state-dir", state).returncode == 0
    assert token_id not in xdsd("token", "list", "--state-dir", state).stdout
    assert "revoked" in xdsd("token", "list", "--all", "--state-dir", state).stdout
    rotated = xdsd("token", "rotate-key", "--state-dir", state)
    assert rotated.returncode == 0 and "new signing key" in rotated.stdout
    assert xdsd("token", "retire-key", "--state-dir", state).returncode == 0
    assert xdsd("token", "retire-key", "--state-dir", state).returncode == 1  # nothing left to retire
    assert "key retired" in xdsd("token", "list", "--all", "--state-dir", state).stdout
    # Revoking a node revokes every token it was issued so far; a new one is fine.
    for _ in range(2):
        assert xdsd("token", "--node-id", "vm-2", "--cluster", "reviews", "--state-dir", state).returncode == 0
    assert xdsd("token", "revoke", "--node-id", "vm-2", "--state-dir", state).returncode == 0
    assert "vm-2" not in xdsd("token", "list", "--state-dir", state).stdout
    assert [line.split()[-1] for line in xdsd("token", "list", "--all", "--state-dir", state).stdout.splitlines()
            if " vm-2 " in line] == ["revoked", "revoked"]
    assert xdsd("token", "--node-id", "vm-2", "--cluster", "reviews", "--state-dir", state).returncode == 0
    assert " vm-2 " in xdsd("token", "list", "--state-dir", state).stdout
    bad = xdsd("token", "--state-dir", state)
    assert bad.returncode == 2 and "--node-id" in bad.stderr
    assert xdsd("token", "--node-id", "x", "--cluster", "y", "--ttl", "0s", "--state-dir", state).returncode == 2


def test_retire_key_with_a_kid_retires_only_that_key(tmp_path: Path) -> None:
    state = str(tmp_path)

    def rotate() -> str:
        out = xdsd("token", "rotate-key", "--state-dir", state)
        assert out.returncode == 0, out.stderr
        return out.stdout.split("tokens of key ", 1)[1].split()[0]  # the key that was current

    assert xdsd("token", "--node-id", "old-1", "--cluster", "c", "--state-dir", state).returncode == 0
    first = rotate()
    assert xdsd("token", "--node-id", "mid-1", "--cluster", "c", "--state-dir", state).returncode == 0
    rotate()
    assert xdsd("token", "retire-key", "--kid", first, "--state-dir", state).returncode == 0
    states = {line.split()[2]: line.split(None, 5)[-1] for line in
              xdsd("token", "list", "--all", "--state-dir", state).stdout.splitlines()[1:]}
    assert states == {"old-1": "key retired", "mid-1": "valid"}, states


@pytest.mark.parametrize("node_id", ["n", "y", "N", "Y", "no", "on", "true", "null", "123"])
def test_node_ids_that_yaml_could_misread_stay_strings(node_id: str, tmp_path: Path) -> None:
    """Envoy reads a plain `id: n` as the boolean false (YAML 1.1): such ids are quoted."""
    out = xdsd("bootstrap", "--node-id", node_id, "--cluster", "c", "--no-token", "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"id: '{node_id}'" in out.stdout or f'id: "{node_id}"' in out.stdout, out.stdout
    assert yaml.safe_load(out.stdout)["node"]["id"] == node_id
