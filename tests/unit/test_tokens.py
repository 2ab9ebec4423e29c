from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2

from xdsd.auth.node import token_authenticator
from xdsd.auth.tokens import TOKEN_HEADER, TokenError, TokenSigner


def test_token_round_trip_and_forgery(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    token = signer.issue("reviews-1", "reviews")
    claims = signer.verify(token)
    assert (claims.node_id, claims.cluster) == ("reviews-1", "reviews")
    with pytest.raises(TokenError):
        signer.verify(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    with pytest.raises(TokenError):
        TokenSigner.load_or_create(tmp_path / "other").verify(token)
    assert oct((tmp_path / "token.key").stat().st_mode & 0o777) == "0o600"


def test_authenticator_binds_node_id_and_service(tmp_path: Path) -> None:
    signer = TokenSigner.load_or_create(tmp_path)
    auth = token_authenticator(signer)
    node = base_pb2.Node(id="reviews-1", cluster="reviews")
    assert auth(node, {TOKEN_HEADER: signer.issue("reviews-1", "reviews")}) is None
    assert auth(node, {}).startswith("missing-token")  # type: ignore[union-attr]
    assert auth(node, {TOKEN_HEADER: "v1.x.y"}).startswith("bad-token")  # type: ignore[union-attr]
    assert auth(node, {TOKEN_HEADER: signer.issue("reviews-2", "reviews")}).startswith("wrong-node")  # type: ignore[union-attr]
    assert auth(node, {TOKEN_HEADER: signer.issue("reviews-1", "ratings")}).startswith("wrong-cluster")  # type: ignore[union-attr]
