"""`xdsd bootstrap` and `xdsd token` through the CLI, as an operator runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    bad = xdsd("token", "--state-dir", state)
    assert bad.returncode == 2 and "--node-id" in bad.stderr
    assert xdsd("token", "--node-id", "x", "--cluster", "y", "--ttl", "0s", "--state-dir", state).returncode == 2
