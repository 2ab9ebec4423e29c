"""Tokens (format, expiry, keys), the revocation ledger, and the access checks built on them."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from xdsd.auth import ledger
from xdsd.auth.access import Access, Denied
from xdsd.auth.node import node_authenticator
from xdsd.auth.tokens import NODE, OPERATOR, TOKEN_HEADER, Keyring, TokenError, TokenSigner, parse_ttl


def test_token_round_trip_carries_id_kind_and_expiry(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    token, claims = signer.mint("reviews-1", "reviews", ttl=3600, now=1_000_000.0)
    got = signer.verify(token, now=1_000_100.0)
    assert got == claims
    assert (got.kind, got.node_id, got.cluster) == (NODE, "reviews-1", "reviews")
    assert got.expires_at == 1_003_600.0 and len(got.token_id) == 16
    assert oct((tmp_path / "token.key").stat().st_mode & 0o777) == "0o600"


def test_a_token_expires(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    token = signer.issue("n", "c", ttl=10, now=1000.0)
    signer.verify(token, now=1009.0)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, now=1010.0)


def test_forged_tampered_and_foreign_tokens_are_refused(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    token = signer.issue("reviews-1", "reviews")
    with pytest.raises(TokenError):
        signer.verify(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    with pytest.raises(TokenError):
        TokenSigner.load_or_create(tmp_path / "other").verify(token)
    # The payload re-signed by nobody: claims changed, MAC kept.
    version, payload, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["cluster"] = "ratings"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="signature"):
        signer.verify(f"{version}.{forged}.{mac}")


def test_v1_tokens_are_refused_with_a_way_out(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    with pytest.raises(TokenError, match="v1 is no longer accepted"):
        signer.verify("v1.eyJub2RlIjoiYSJ9.sig")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.none(), st.integers(), st.lists(st.text())))
def test_anything_a_client_sends_is_a_token_error_never_a_crash(value: object) -> None:
    signer = TokenSigner(b"k" * 32)
    with pytest.raises(TokenError):
        signer.verify(value)


def test_non_ascii_token_is_refused() -> None:
    with pytest.raises(TokenError):
        TokenSigner(b"k" * 32).verify("v1.e30.\xc3\xa9")


def test_rotate_then_retire_key(tmp_path: Path) -> None:
    old = TokenSigner.load_or_create(tmp_path).issue("n", "c")
    old_kid, new_kid = Keyring.rotate(tmp_path)
    assert old_kid != new_kid
    signer = TokenSigner.load_or_create(tmp_path)
    new = signer.issue("n", "c")
    assert signer.verify(old).key_id == old_kid  # the previous key still verifies
    assert signer.verify(new).key_id == new_kid
    assert Keyring.retire(tmp_path) == [old_kid]
    signer = TokenSigner.load_or_create(tmp_path)
    with pytest.raises(TokenError, match="retired"):
        signer.verify(old)
    signer.verify(new)


def test_parse_ttl() -> None:
    assert parse_ttl("365d") == 365 * 86400
    assert parse_ttl("12h") == 43200 and parse_ttl("30m") == 1800 and parse_ttl("90s") == 90 and parse_ttl("7") == 7
    for bad in ("0s", "-1d", "x", "", "1y", "1e400"):
        with pytest.raises(ValueError):
            parse_ttl(bad)


def _access(tmp_path: Path) -> tuple[Access, TokenSigner]:
    access = Access.from_state_dir(tmp_path)
    assert access.signer is not None
    return access, access.signer


def test_node_authenticator_binds_node_id_and_service(tmp_path: Path) -> None:
    access, signer = _access(tmp_path)
    auth = node_authenticator(access)
    node = base_pb2.Node(id="reviews-1", cluster="reviews")
    assert auth(node, {TOKEN_HEADER: signer.issue("reviews-1", "reviews")}).node_id == "reviews-1"
    cases = {
        "missing-token": {},
        "bad-token": {TOKEN_HEADER: "v2.x.y"},
        "wrong-node": {TOKEN_HEADER: signer.issue("reviews-2", "reviews")},
        "wrong-cluster": {TOKEN_HEADER: signer.issue("reviews-1", "ratings")},
        "not-a-node": {TOKEN_HEADER: signer.operator()},
        "expired": {TOKEN_HEADER: signer.issue("reviews-1", "reviews", ttl=1, now=time.time() - 10)},
    }
    for reason, metadata in cases.items():
        with pytest.raises(Denied) as err:
            auth(node, metadata)
        assert err.value.reason == reason
        assert err.value.unauthenticated == (reason in ("missing-token", "bad-token", "expired"))


def test_operator_and_service_checks(tmp_path: Path) -> None:
    access, signer = _access(tmp_path)
    op = signer.operator()
    assert access.operator(op).kind == OPERATOR
    with pytest.raises(Denied, match="not-operator"):
        access.operator(signer.issue("n", "reviews"))
    assert access.service(signer.issue("n", "reviews"), "reviews").cluster == "reviews"
    with pytest.raises(Denied, match="wrong-cluster"):
        access.service(signer.issue("n", "reviews"), "ratings")
    with pytest.raises(Denied, match="not-a-node"):
        access.service(op, "reviews")
    assert access.caller(op).kind == OPERATOR


def test_revocation_by_id_and_by_node_reaches_a_running_access(tmp_path: Path) -> None:
    access, signer = _access(tmp_path)
    a, a_claims = signer.mint("vm-a", "reviews")
    b = signer.issue("vm-b", "reviews")
    caller_a, caller_b = access.service(a, "reviews"), access.service(b, "reviews")
    assert not access.refresh()  # nothing changed yet
    ledger.revoke(tmp_path, token_id=a_claims.token_id)
    assert access.refresh()
    with pytest.raises(Denied, match="revoked"):
        access.service(a, "reviews")
    assert access.still_valid(caller_a) is not None and access.still_valid(caller_b) is None
    ledger.revoke(tmp_path, node_id="vm-b")
    access.refresh()
    assert access.still_valid(caller_b) is not None
    with pytest.raises(Denied, match="revoked"):
        access.caller(b)
    # Re-enrolment: a token for vm-b issued after the revocation works.
    time.sleep(0.01)
    access.caller(signer.issue("vm-b", "reviews"))


def test_expired_callers_are_found_by_still_valid(tmp_path: Path) -> None:
    access, signer = _access(tmp_path)
    caller = access.caller(signer.issue("n", "c", ttl=1))
    assert access.still_valid(caller) is None
    assert access.still_valid(caller, now=time.time() + 2) is not None


def test_auth_off_lets_everyone_in_anonymously() -> None:
    access = Access.off()
    assert access.caller(None).anonymous
    assert access.operator("garbage").anonymous
    assert access.node(None, "x", "y").anonymous


def test_issued_list_records_claims_not_tokens(tmp_path: Path) -> None:
    from xdsd.auth.commands import mint

    token, claims = mint(tmp_path, "vm-1", "reviews", ttl=60)
    records = ledger.issued(tmp_path)
    assert records == [claims.as_json()]
    assert token not in (tmp_path / "tokens" / "issued.jsonl").read_text()
